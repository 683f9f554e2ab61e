"""Mesh, parameter sharding rules and the group-wise batch split.

The multi-device checks run in a subprocess with 8 fake CPU devices
(`--xla_force_host_platform_device_count` must be set before JAX starts;
this pytest process has already started it with one device).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from groupdiff_jax import sharding, step_plan
from tests import cpu_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shape_fills_the_minus_one_axis_and_rejects_bad_sizes():
  assert sharding.mesh_shape(8, -1, 4) == (2, 4, 1)
  assert sharding.mesh_shape(8, 8, -1) == (8, 1, 1)
  assert sharding.mesh_shape(8) == (8, 1, 1)
  assert sharding.mesh_shape(8, -1, 2, 2) == (2, 2, 2)
  with pytest.raises(ValueError):
    sharding.mesh_shape(8, 3, -1)
  with pytest.raises(ValueError):
    sharding.mesh_shape(8, -1, -1)
  with pytest.raises(ValueError, match='mesh.group=3'):
    sharding.mesh_shape(8, -1, 1, 3)


def test_auto_group_split_is_the_smallest_that_the_batch_needs():
  official = step_plan.step_kinds(256, 4, 0.1, mixed_steps=False).values()  # 256 singles; 64 groups of 4
  assert sharding.auto_group(official, 64) == 1  # whole groups on each of 64 devices
  assert sharding.auto_group(official, 128) == 2  # v5p-256: 64 data shards, a group over 2 devices
  assert sharding.auto_group(official, 256) == 4  # v5e-256
  assert sharding.auto_group(official, 128, fsdp=2) == 2  # whole groups per data x fsdp shard: 64 of them
  uc16 = step_plan.step_kinds(256, 16, 0.1, mixed_steps=False).values()  # 16 groups of 16
  assert sharding.auto_group(uc16, 64) == 4 and sharding.auto_group(uc16, 256) == 16
  # Two slices of 64: data spans both (dcn), so 128 data shards would need 128 groups: split over 2.
  assert sharding.auto_group(official, 64, dcn=(2, 1, 1)) == 2
  assert sharding.auto_group((), 128) == 1  # no step kinds given: no split
  assert sharding.auto_group(official, 3) == 1  # nothing fits: check_groups_fit_mesh names the batch


def test_param_rules_shard_large_kernels_on_their_largest_dimension():
  spec = lambda path, shape, min_size=0: sharding.param_spec(path, shape, 4, min_size=min_size)
  assert spec('params/blocks_0/attn/qkv/kernel', (1152, 3456)) == P(None, 'fsdp')
  assert spec('params/blocks_0/mlp/fc2/kernel', (4608, 1152)) == P('fsdp', None)
  # Optimizer state carries the parameter's path: sharded alike.
  assert spec('opt_state/1/0/mu/blocks_0/mlp/fc2/kernel', (4608, 1152)) == P('fsdp', None)
  assert spec('params/y_embedder/embedding_table/embedding', (1001, 1152)) == P(None, 'fsdp')
  # Biases, scalars, tiny leaves: replicated. No divisible dimension: replicated.
  assert spec('params/blocks_0/attn/qkv/bias', (3456,)) == P()
  assert spec('opt_state/0/count', ()) == P()
  assert spec('params/blocks_0/attn/qkv/kernel', (32, 96), min_size=2**14) == P()
  assert spec('params/x_embedder/proj/kernel', (2, 2, 3, 5)) == P()
  assert sharding.param_spec('params/a/kernel', (1152, 3456), 1) == P()


def test_sharded_update_splits_params_ema_and_optimizer_state_over_data_and_group():
  zero = (('data', 8), ('group', 2))
  spec = lambda path, shape, fsdp=4: sharding.param_spec(path, shape, fsdp, min_size=0, update_axes=zero)
  # The update's state (float32 params, EMA, Adam) adds data x group to the fsdp dimension.
  for path in ('params/blocks_0/attn/qkv/kernel', 'opt_state/1/0/mu/blocks_0/attn/qkv/kernel',
               'ema_params/blocks_0/attn/qkv/kernel'):
    assert spec(path, (1152, 3456)) == P(None, ('fsdp', 'data', 'group'))
  # Biases (replicated without ZeRO) are split too. Nothing divisible: whole. The step counter and key: whole.
  assert spec('opt_state/1/0/nu/blocks_0/attn/qkv/bias', (3456,)) == P(('data', 'group'))
  assert spec('params/blocks_0/attn/qkv/bias', (3456,), fsdp=1) == P(('data', 'group'))
  assert spec('ema_params/final_layer/linear/bias', (7,)) == P()
  # data x group (16) does not divide 8, data (8) alone does: split over data only.
  assert spec('ema_params/final_layer/linear/bias', (8,)) == P('data')
  # v5e-256's official mesh (data 64, group 4): 256 divides neither dimension of SiT-XL/2's qkv or attention
  # projection; data alone (64) takes the larger dimension (the later one on a tie).
  v5e = lambda shape: sharding.param_spec('params/blocks_0/attn/qkv/kernel', shape, 1, min_size=0,
                                          update_axes=(('data', 64), ('group', 4)))
  assert v5e((1152, 3456)) == P(None, 'data') and v5e((1152, 1152)) == P(None, 'data')
  assert v5e((1152, 4608)) == P(None, ('data', 'group'))  # 4608 = 18 x 256: both
  assert spec('rng', (2,)) == spec('step', ()) == spec('opt_state/0/count', ()) == P()
  # 96 takes fsdp (4) but not fsdp x data x group (64): data x group go to the other dimension.
  assert spec('params/a/kernel', (96, 32)) == P('fsdp', ('data', 'group'))


def test_the_model_reads_params_gathered_over_the_update_axes_only():
  mesh = AbstractMesh((2, 4, 2), sharding.MESH_AXES)
  compute = lambda spec: sharding.compute_sharding(NamedSharding(mesh, spec)).spec
  assert compute(P(None, ('fsdp', 'data', 'group'))) == P(None, 'fsdp')
  assert compute(P(('data', 'group'), 'fsdp')) == P(None, 'fsdp')
  assert compute(P('fsdp', ('data', 'group'))) == P('fsdp', None)
  assert compute(P(('data', 'group'))) == P()
  assert compute(P()) == P()


WORKER = textwrap.dedent('''
    import functools, json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, os.getcwd())
    from configs import digits
    from groupdiff_jax import checkpoint, sharding, step_plan, train_step as ts
    from groupdiff_jax.models import dit
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8
    config = digits.get_config()
    config.model.update(depth=1, hidden_size=32, num_heads=2, input_size=8, variant='SiT-S/2')
    config.train.batch_size = 64
    config.optim.eps = 1e-3  # Adam's first step is ~sign(g): keep it smooth in g for the comparison
    kinds = step_plan.step_kinds(64, 4, 0.5, mixed_steps=True)  # 32 singles + 8 groups of 4: one compile
    model = dit.model_from_config(config.model)
    rng = np.random.default_rng(0)
    batches = [tuple({'images': rng.standard_normal((s.num_images, 8, 8, 1)).astype(np.float32),
                      'labels': rng.integers(0, 10, s.num_images).astype(np.int32)} for s in kinds[name])
               for name in ('mixed', 'mixed')]
    names = ('mixed', 'mixed')

    def plain():
      state = jax.jit(lambda key: ts.create_train_state(model, config, key))(jax.random.PRNGKey(0))
      step = jax.jit(functools.partial(ts.train_step, kind=kinds['mixed'], train_config=config.train,
                                       optim_config=config.optim, max_group_size=4, null_class=10,
                                       model_config=config.model))
      losses = []
      for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics['loss']))
      return state, losses

    def sharded(data, fsdp, zero=False):
      config.mesh.data, config.mesh.fsdp, config.mesh.shard_update = data, fsdp, zero
      config.mesh.min_sharded_size = 0 if fsdp > 1 or zero else 2**14
      mesh = sharding.make_mesh(config.mesh)
      state, shardings = ts.create_sharded_train_state(model, config, mesh, jax.random.PRNGKey(0))
      run = ts.make_jitted_train_step(config, mesh, shardings)
      losses = []
      for name, batch in zip(names, batches):
        state, metrics = run(state, batch, kinds[name])
        losses.append(float(metrics['loss']))
      return mesh, state, losses

    out = {}
    ref_state, ref_losses = plain()
    ref_params = jax.tree.leaves(ref_state.params)
    states = {}
    for data, fsdp, zero in ((2, 4, False), (8, 1, False), (8, 1, True), (2, 4, True)):
      mesh, state, losses = sharded(data, fsdp, zero)
      key = f'{data}x{fsdp}' + ('z' if zero else '')
      states[key] = state
      out[key + '_loss_err'] = float(np.max(np.abs(np.subtract(losses, ref_losses))))
      out[key + '_param_err'] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                   for a, b in zip(jax.tree.leaves(state.params), ref_params))
      qkv = state.params['blocks_0']['attn']['qkv']['kernel']
      mu = state.opt_state[1][0].mu['blocks_0']['attn']['qkv']['kernel']
      out[key + '_qkv_spec'] = str(qkv.sharding.spec)
      out[key + '_mu_spec'] = str(mu.sharding.spec)
      out[key + '_ema_spec'] = str(state.ema_params['blocks_0']['attn']['qkv']['kernel'].sharding.spec)
      out[key + '_qkv_shard_shape'] = list(qkv.addressable_shards[0].data.shape)
      out[key + '_bias_spec'] = str(state.params['blocks_0']['attn']['qkv']['bias'].sharding.spec)
      # The group batch as the step sees it: every device holds whole groups.
      labels = jax.device_put(batches[0][1]['labels'], sharding.batch_sharding(mesh))
      rows = [(s.index[0].start, s.index[0].stop) for s in labels.addressable_shards]
      out[key + '_rows'] = sorted(rows)
      if key == '2x4':  # save on the (2, 4) mesh; restored below into the (8, 1) state
        manager = checkpoint.checkpoint_manager(sys.argv[1])
        checkpoint.save(manager, state)
        manager.wait_until_finished()
        fsdp_params = jax.tree.map(np.asarray, state.params)

    # A group that straddles two devices is refused.
    try:
      sharding.check_groups_fit_mesh((step_plan.SubBatch(24, 4, False),), mesh)
      out['refused'] = False
    except ValueError:
      out['refused'] = True

    # The checkpoint saved on the (2, 4) mesh restores into the (8, 1) mesh's state.
    target = states['8x1'].replace(params=jax.tree.map(jnp.zeros_like, states['8x1'].params))
    restored = checkpoint.restore_latest(manager, target)
    out['restore_err'] = max(float(np.max(np.abs(np.asarray(a) - b)))
                             for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(fsdp_params)))
    out['restored_spec'] = str(restored.params['blocks_0']['attn']['qkv']['kernel'].sharding.spec)
    out['restored_step'] = int(restored.step)
    # The same checkpoint (saved without ZeRO) restores into a ZeRO state (params split over data), and a
    # ZeRO one into the (2, 4) state without it.
    zero = states['8x1z']
    restored = checkpoint.restore_latest(manager, zero.replace(params=jax.tree.map(jnp.zeros_like, zero.params)))
    out['zero_restore_err'] = max(float(np.max(np.abs(np.asarray(a) - b)))
                                  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(fsdp_params)))
    out['zero_restored_spec'] = str(restored.params['blocks_0']['attn']['qkv']['kernel'].sharding.spec)
    manager = checkpoint.checkpoint_manager(sys.argv[1] + '_zero')
    checkpoint.save(manager, states['2x4z'])
    manager.wait_until_finished()
    plain_target = states['2x4']
    restored = checkpoint.restore_latest(manager, plain_target.replace(
        params=jax.tree.map(jnp.zeros_like, plain_target.params)))
    out['unzero_restore_err'] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree.leaves((restored.params, restored.opt_state)),
        jax.tree.leaves((states['2x4z'].params, states['2x4z'].opt_state))))
    out['unzero_restored_spec'] = str(restored.opt_state[1][0].mu['blocks_0']['attn']['qkv']['kernel'].sharding.spec)
    print('RESULT ' + json.dumps(out))
''')


def run_worker(code, *args, devices=8, timeout=300):
  # Its programs (and orbax's many small slice programs) run in this process only: caching them would only
  # write files, so the shared cache keeps just the compiles of 1 s or more here.
  env = cpu_devices.env(devices, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1')
  proc = subprocess.run([sys.executable, '-c', code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  return run_worker(WORKER, str(tmp_path_factory.mktemp('ckpt')), timeout=900)  # 4 meshes, 3 restores


@pytest.mark.parametrize('mesh', ['2x4', '8x1', '8x1z', '2x4z'])
def test_sharded_step_equals_the_single_device_step(eight_devices, mesh):
  """Data parallel, fsdp, and both with the sharded update (z: ZeRO-2, params gathered for the model)."""
  assert eight_devices[mesh + '_loss_err'] < 1e-5
  assert eight_devices[mesh + '_param_err'] < 1e-6


def test_params_ema_and_optimizer_state_are_really_sharded_over_fsdp(eight_devices):
  r = eight_devices
  assert r['2x4_qkv_spec'] == r['2x4_mu_spec'] == r['2x4_ema_spec'] == str(P(None, 'fsdp'))
  assert r['2x4_qkv_shard_shape'] == [32, 96 // 4]
  assert r['2x4_bias_spec'] == str(P())
  assert r['8x1_qkv_spec'] == str(P())


def test_the_sharded_update_splits_params_and_state_over_data(eight_devices):
  r = eight_devices
  assert r['8x1z_qkv_spec'] == r['8x1z_mu_spec'] == r['8x1z_ema_spec'] == str(P(None, 'data'))
  assert r['8x1z_qkv_shard_shape'] == [32, 96 // 8]
  assert r['2x4z_qkv_spec'] == r['2x4z_mu_spec'] == str(P(None, ('fsdp', 'data')))
  assert r['2x4z_bias_spec'] == str(P('data'))  # replicated without ZeRO; split over data with it


def test_checkpoints_restore_with_and_without_the_sharded_update(eight_devices):
  r = eight_devices
  assert r['zero_restore_err'] == 0.0 and r['zero_restored_spec'] == str(P(None, 'data'))
  assert r['unzero_restore_err'] == 0.0 and r['unzero_restored_spec'] == str(P(None, 'fsdp'))


def test_each_device_holds_whole_groups(eight_devices):
  # 8 groups of 4 over 8 devices: device d holds rows 4d..4d+3, one whole group.
  for mesh in ('2x4', '8x1'):
    assert eight_devices[mesh + '_rows'] == [[4 * d, 4 * d + 4] for d in range(8)]
  assert eight_devices['refused']


def test_checkpoint_saved_on_one_mesh_restores_on_another(eight_devices):
  assert eight_devices['restore_err'] == 0.0
  assert eight_devices['restored_spec'] == str(P()) and eight_devices['restored_step'] == 2


def test_activation_rules_split_only_the_batch_axis():
  assert sharding.logical_spec(('batch', 'length', 'embed')) == P(('data', 'fsdp', 'group'), None, None)
