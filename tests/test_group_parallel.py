"""Group-parallel attention and the sharded update (ZeRO) are exact, on 8 CPU devices.

Tolerance, derived from float32 error growth: a float32 sum of n terms is
off by at most gamma_n = n*u/(1 - n*u) times the sum of the terms'
magnitudes (u = 2**-24; Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., section 4.2). Splitting a group over devices changes
only the order of sums: over the T = N*L keys of a group in attention
(softmax normaliser and weighted values in the forward; dP, dV and dK in the
backward: at most 4 sums of T terms on one path) and over the B images of
the batch in a parameter gradient (the all-reduce/reduce-scatter). Each
weight of a softmax is <= 1 and they sum to 1, so every such sum is bounded
by the largest magnitude M of the reference array; one layer's rounding
difference is then at most gamma_{4T+B} * M. A later layer can amplify an
earlier difference; with the random weights used here (std 0.1 at width 64:
a Dense layer's gain is about 0.1 * sqrt(64) = 0.8) each block is taken to
amplify it at most 2x (its residual branch adds a term no larger than its
input), hence, for a model of `depth` blocks,

  tol = 2**depth * gamma_{4T+B} * M,

and for attention alone (depth 0) gamma_{4T} * M. The train step's Adam
update g / (|g| + eps) (first step) changes by at most lr/eps times a
gradient difference, which sets its parameters' tolerance.
"""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests import test_sharding

pytestmark = pytest.mark.long  # compiles on 8 fake devices in subprocesses: .ci/run's second step

U = 2.0**-24


def gamma(n):
  return n * U / (1 - n * U)


def run_worker(code, *args):
  return test_sharding.run_worker(code, *args, timeout=1200)  # several compiles on 8 fake devices


def tolerance(reference_max, terms, depth=0):
  return 2.0**depth * gamma(terms) * reference_max


ATTENTION = '''
import json
import jax, jax.numpy as jnp, numpy as np
from configs import default
from groupdiff_jax import compiled_stats, sharding
from groupdiff_jax.models import dit, group_attention as ga


def mesh_config(**fields):
  config = default.get_config().mesh
  config.update(fields)
  return config

out = {'attention': [], 'model': []}
L, H, D = 16, 8, 8
# (devices a group spans, group size N, collective); (4, 2): 2 groups per (data x fsdp) shard over a group axis
# of 4, a ring of collective-permutes.
CASES = ((2, 4, 'all_gather'), (4, 8, 'all_gather'), (8, 16, 'all_gather'), (8, 16, 'all_to_all'),
         (4, 2, 'all_gather'))


def collectives(hlo):  # {op: count} by the reports' rule
  counted = compiled_stats.collectives(hlo)
  return {c: counted[c]['count'] for c in ('all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')}


def attention_case(impl, split, n, collective):
  config = mesh_config(data=-1, group=split, group_collective=collective)
  mesh = sharding.make_mesh(config)
  batch = 8 if n == 2 else 16  # n = 2: 4 groups over data=2, each over 2 of the group axis' 4 devices
  keys = jax.random.split(jax.random.PRNGKey(split * n), 4)
  q, k, v = (jax.random.normal(key, (batch, L, H, D)) for key in keys[:3])
  cotangent = jax.random.normal(keys[3], (batch, L, H, D))

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: ga.group_attention(q, k, v, n, impl), q, k, v)
    return (out,) + vjp(cotangent)

  ref = jax.jit(fwd_bwd)(q, k, v)
  with sharding.use_mesh(mesh, config):
    run = jax.jit(fwd_bwd, in_shardings=(sharding.batch_sharding(mesh),) * 3).lower(q, k, v).compile()
  got, hlo = run(*jax.device_put((q, k, v), sharding.batch_sharding(mesh))), run.as_text()
  return {'impl': impl, 'split': split, 'n': n, 'collective': collective, 'tokens': n * L,
          'err': [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, ref)],
          'ref_max': [float(jnp.max(jnp.abs(b))) for b in ref], 'collectives': collectives(hlo),
          'local_q_rows': got[0].addressable_shards[0].data.shape[0], 'batch': batch}


for impl in ('xla', 'chunked', 'splash'):
  for split, n, collective in CASES:
    if impl != 'xla' and (split, n, collective) in ((8, 16, 'all_gather'), (4, 2, 'all_gather')):
      continue  # the kernels' own cases: a split over 2, 4 and 8 (Ulysses); the collectives are the same
    out['attention'].append(attention_case(impl, split, n, collective))

# The whole model: forward and parameter gradients, a group split over 2, 4, 8 devices.
TINY = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=64, depth=2, num_heads=8, num_classes=5,
            learn_sigma=False, max_group_size=16)
rng = np.random.default_rng(0)
x = rng.standard_normal((16, 8, 8, 3)).astype(np.float32)
t = rng.uniform(0, 1, 16).astype(np.float32)
y = rng.integers(0, 6, 16).astype(np.int32)
ids = np.tile(np.arange(16), 1).astype(np.int32) % 16
ct = rng.standard_normal((16, 8, 8, 3)).astype(np.float32)


def model_case(split, n, group_layers=None, impl='xla', collective='all_to_all'):
  model = dit.DiT(**TINY, group_layers=group_layers, attention_impl=impl)
  params = model.init(jax.random.PRNGKey(0), x, t, y, ids % n)['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])

  def fwd_bwd(params, x):
    out, vjp = jax.vjp(lambda p: model.apply({'params': p}, x, t, y, ids % n, group_size=n), params)
    return out, vjp(ct)[0]

  ref = jax.jit(fwd_bwd)(params, x)
  config = mesh_config(data=-1, group=split, group_collective=collective)
  mesh = sharding.make_mesh(config)
  with sharding.use_mesh(mesh, config):
    run = jax.jit(fwd_bwd, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))
    run = run.lower(params, x).compile()
  got = run(jax.device_put(params, sharding.replicated(mesh)), jax.device_put(x, sharding.batch_sharding(mesh)))
  hlo = run.as_text()
  pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
  return {'split': split, 'n': n, 'group_layers': group_layers, 'collective': collective, 'tokens': n * 16,
          'out_err': float(jnp.max(jnp.abs(pairs[0][0] - pairs[0][1]))),
          'out_max': float(jnp.max(jnp.abs(pairs[0][1]))),
          'grad_err': [float(jnp.max(jnp.abs(a - b))) for a, b in pairs[1:]],
          'grad_max': [float(jnp.max(jnp.abs(b))) for _, b in pairs[1:]],
          'collectives': collectives(hlo)}


for split, n in ((2, 4), (4, 8), (8, 16)):  # the default collective (all_to_all)
  out['model'].append(model_case(split, n))
for collective in ('all_gather', 'all_to_all'):
  if collective == 'all_gather':
    out['model'].append(model_case(8, 16, collective=collective))
  out['model'].append(model_case(8, 16, group_layers=(0, 1), collective=collective))
print('RESULT ' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def split_attention():
  return run_worker(ATTENTION)


def test_split_group_attention_equals_the_unsplit_one_for_every_cpu_kernel(split_attention):
  cases = split_attention['attention']
  assert {c['impl'] for c in cases} == {'xla', 'chunked', 'splash'}
  for c in cases:
    for name, err, ref_max in zip(('out', 'dq', 'dk', 'dv'), c['err'], c['ref_max']):
      assert err <= tolerance(ref_max, 4 * c['tokens']), (c, name)
    # Each device holds batch / 8 query images, fewer than a group: the group really is split over devices.
    assert c['local_q_rows'] == c['batch'] // 8 < c['n']


def test_split_attention_uses_the_named_collective(split_attention):
  for c in split_attention['attention']:
    moved = {op for op, count in c['collectives'].items() if count}
    if c['collective'] == 'all_to_all':
      assert moved == {'all-to-all'}, c  # Ulysses: heads for members, and back (forward and backward)
    elif c['split'] * 2 == 8 and c['n'] == 2:
      assert moved == {'collective-permute'}, c  # a group spans 2 of the axis' 4 devices: a ring
    else:
      # Keys and values gathered; the backward of a gather is a reduce-scatter.
      assert moved == {'all-gather', 'reduce-scatter'}, c


def test_split_model_forward_and_gradients_equal_the_unsplit_model(split_attention):
  for c in split_attention['model']:
    terms = 4 * c['tokens'] + 16
    assert c['out_err'] <= tolerance(c['out_max'], terms, depth=2), c
    for err, ref_max in zip(c['grad_err'], c['grad_max']):
      assert err <= tolerance(ref_max, terms, depth=2), c


def test_blocks_without_group_attention_move_no_activations(split_attention):
  for collective, moved in (('all_gather', ('all-gather', 'reduce-scatter')), ('all_to_all', ('all-to-all',))):
    every, first_only = [c for c in split_attention['model'] if c['split'] == 8 and c['collective'] == collective]
    assert first_only['group_layers'] == [0, 1]
    # all_gather: K and V of each group-attention block gathered once (reduce-scattered back in the backward);
    # all_to_all: q, k, v and the output exchanged, forward and backward.
    for op in moved:
      assert every['collectives'][op] == 2 * first_only['collectives'][op] > 0, (collective, op)


TRAIN = '''
import functools, json, sys
import jax, jax.numpy as jnp, numpy as np
from configs import digits
from groupdiff_jax import checkpoint, errors, sample, sharding, step_plan, train_step as ts
from groupdiff_jax.models import dit

config = digits.get_config()
config.model.update(depth=2, hidden_size=32, num_heads=4, input_size=8, variant='SiT-S/2', max_group_size=4)
config.train.batch_size = 32
config.train.timestep_jitter = 0.1
config.optim.eps = 1e-3  # Adam's first step is ~sign(g): keep it smooth in g for the comparison
config.mesh.min_sharded_size = 0
model = dit.model_from_config(config.model)
rng = np.random.default_rng(0)
kinds = dict(step_plan.step_kinds(32, 4, 0.5, mixed_steps=True))  # 16 singles + 4 groups of 4 in one step
kinds['f'] = step_plan.step_kinds(16, 4, 0.0, mode='groupdiff_f')['singles']  # GroupDiff-f: 4 cond. groups of 4
plan = ('mixed', 'f')
batches = [tuple({'images': rng.standard_normal((s.num_images, 8, 8, 1)).astype(np.float32),
                  'labels': rng.integers(0, 10, s.num_images).astype(np.int32)} for s in kinds[name])
           for name in plan]


def mesh_config(**fields):
  mesh = digits.get_config().mesh
  mesh.update(fields)
  return mesh


def train(mesh_fields, devices=8):
  config.mesh.update(data=-1, fsdp=1, group=1, shard_update=False)
  config.mesh.update(mesh_fields)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  state, shardings = ts.create_sharded_train_state(model, config, mesh, jax.random.PRNGKey(0))
  run = ts.make_jitted_train_step(config, mesh, shardings)
  metrics = []
  for name, batch in zip(plan, batches):
    state, m = run(state, batch, kinds[name])
    metrics.append({k: float(v) for k, v in m.items()})
  return mesh, state, metrics


def state_bytes(tree):
  return sum(l.addressable_shards[0].data.nbytes for l in jax.tree.leaves(tree))


out = {'layouts': {}, 'lr': config.optim.lr, 'eps': config.optim.eps}
_, ref, ref_metrics = train({}, devices=4)  # today's layout: data parallel, one group per device
ref_leaves = [np.asarray(l) for l in jax.tree.leaves((ref.params, ref.ema_params, ref.opt_state))]
out['ref_metrics'] = ref_metrics
out['ref_bytes'] = {k: state_bytes(getattr(ref, k)) for k in ('params', 'ema_params', 'opt_state')}
# (fields, devices): a group over 2 devices (all-gather); ZeRO alone on the 4 data-parallel devices; a group
# over 2 of the group axis' 4 devices (2 groups per data shard: a ring of permutes) with ZeRO; all of them.
LAYOUTS = {'group': (dict(data=4, group=2), 8), 'zero': (dict(shard_update=True), 4),
           'group+zero': (dict(data=2, group=4, shard_update=True), 8),
           'fsdp+group+zero': (dict(data=2, fsdp=2, group=2, shard_update=True), 8)}
for name, (fields, devices) in LAYOUTS.items():
  mesh, state, metrics = train(fields, devices)
  leaves = jax.tree.leaves((state.params, state.ema_params, state.opt_state))
  out['layouts'][name] = {
      'metrics': metrics,
      'param_err': max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(leaves, ref_leaves)),
      'param_max': max(float(np.max(np.abs(b))) for b in ref_leaves),
      'bytes': {k: state_bytes(getattr(state, k)) for k in ('params', 'ema_params', 'opt_state')},
      'mu_spec': str(state.opt_state[1][0].mu['blocks_0']['attn']['qkv']['kernel'].sharding.spec),
      'mesh': dict(mesh.shape)}
  if name == 'fsdp+group+zero':
    manager = checkpoint.checkpoint_manager(sys.argv[1])
    checkpoint.save(manager, state)
    manager.wait_until_finished()
    saved = jax.tree.map(np.asarray, (state.params, state.ema_params, state.opt_state))

# Saved under (data 2, fsdp 2, group 2, ZeRO), restored under plain data parallelism.
target = ref.replace(params=jax.tree.map(jnp.zeros_like, ref.params))
restored = checkpoint.restore_latest(manager, target)
out['restore_err'] = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in
                         zip(jax.tree.leaves((restored.params, restored.ema_params, restored.opt_state)),
                             jax.tree.leaves(saved)))
out['restored_spec'] = str(restored.opt_state[1][0].mu['blocks_0']['attn']['qkv']['kernel'].sharding.spec)

# A mesh whose group axis does not divide the group size: one error naming both.
mesh6 = sharding.make_mesh(mesh_config(data=2, group=3), devices=jax.devices()[:6])
try:
  sharding.check_groups_fit_mesh((step_plan.SubBatch(24, 4, False),), mesh6)
  out['refusal'] = None
except errors.ConfigError as error:
  out['refusal'] = str(error)

# Sampling: GroupDiff-l (uncond. branch in groups of 4, group split over 4 devices) and GroupDiff-f
# (both branches in groups), Euler, 3 steps, CFG.
params = ref.ema_params
labels = jnp.asarray(np.repeat(np.arange(4), 4), jnp.int32)  # 4 groups of 4
out['sampling'] = {}
for name, cond_size in (('l', 1), ('f', 4)):
  scfg = config.sample
  scfg.update(sampler='euler', num_steps=3, images_per_group=4, cond_group_size=cond_size, uncond_group_size=4,
              cfg_scale=2.0, groups_per_batch=4)
  key = jax.random.PRNGKey(3)
  plain, _ = sample.make_sampler(model, scfg, config.model)(params, labels, key)
  fields = mesh_config(data=2, group=4)
  mesh = sharding.make_mesh(fields)
  split, _ = sample.make_sampler(model, scfg, config.model, mesh, fields)(params, labels, key)
  plain = np.asarray(plain)
  out['sampling'][name] = {'err': float(np.max(np.abs(np.asarray(split) - plain))), 'max': float(np.max(np.abs(plain))),
                           'local_rows': split.addressable_shards[0].data.shape[0]}
print('RESULT ' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
  return run_worker(TRAIN, str(tmp_path_factory.mktemp('ckpt')))


@pytest.mark.parametrize('layout', ['group', 'zero', 'group+zero', 'fsdp+group+zero'])
def test_train_steps_under_new_layouts_equal_the_data_parallel_steps(layouts, layout):
  """Mixed step (singles + unconditional groups), GroupDiff-f step, groups step; time jitter 0.1."""
  got, ref = layouts['layouts'][layout], layouts['ref_metrics']
  depth, tokens, images = 2, 4 * 16, 32
  for g, r in zip(got['metrics'], ref):
    assert g['nonfinite'] == r['nonfinite'] == 0
    # The loss is a mean over the images of sums over the tokens: the forward's error plus the mean's.
    assert abs(g['loss'] - r['loss']) <= tolerance(abs(r['loss']), 4 * tokens + images, depth) + gamma(images) * r['loss']
    assert abs(g['grad_norm'] - r['grad_norm']) <= tolerance(r['grad_norm'], 4 * tokens + images, depth + 1)
  # A parameter moves by lr * g / (|g| + eps) per step: a gradient difference d changes it by <= lr/eps * d,
  # over 3 steps, with gradients of magnitude <= the gradient norm.
  grad_tol = tolerance(max(r['grad_norm'] for r in ref), 4 * tokens + images, depth)
  assert got['param_err'] <= 3 * layouts['lr'] / layouts['eps'] * grad_tol + gamma(2) * got['param_max']


def test_sharded_update_divides_the_update_state_by_the_data_axis(layouts):
  ref = layouts['ref_bytes']
  zero = layouts['layouts']['zero']
  assert zero['mesh'] == {'data': 4, 'fsdp': 1, 'group': 1}
  assert 'data' in zero['mu_spec']
  # Parameters, EMA and optimizer state: every leaf of this model has a dimension divisible by 4
  # (min_sharded_size 0) and is split 4 ways, except Adam's int32 step counts (4 bytes each, two in the chain).
  assert zero['bytes']['params'] * 4 == ref['params']
  assert zero['bytes']['ema_params'] * 4 == ref['ema_params']
  assert ref['opt_state'] <= zero['bytes']['opt_state'] * 4 <= ref['opt_state'] + 3 * 2 * 4
  # data 2 x fsdp 2 x group 2: the update state (parameters included) split 8 ways where a dimension divides 8
  # (a few small leaves only 4 or 2 ways).
  both = layouts['layouts']['fsdp+group+zero']
  assert ref['ema_params'] / 8 <= both['bytes']['ema_params'] <= ref['ema_params'] / 6
  assert both['bytes']['params'] == both['bytes']['ema_params']


def test_checkpoint_saved_under_group_and_zero_layout_restores_data_parallel(layouts):
  assert layouts['restore_err'] == 0.0
  assert layouts['restored_spec'] == str(P())  # the target's (data-parallel) layout


def test_a_group_axis_that_does_not_divide_the_group_is_one_clear_error(layouts):
  message = layouts['refusal']
  assert message and 'mesh.group=3' in message and 'group size 4' in message


@pytest.mark.parametrize('mode', ['l', 'f'])
def test_sampling_with_the_group_split_equals_the_unsplit_call(layouts, mode):
  s = layouts['sampling'][mode]
  assert s['local_rows'] == 2  # 16 images over 8 devices: each group of 4 over 2 devices
  # 3 Euler steps, each a model call (depth 2) of groups of 4 x 16 tokens, two branches combined by CFG (x3).
  assert s['err'] <= 3 * 3 * tolerance(s['max'], 4 * 64, depth=2) + gamma(3) * s['max']
