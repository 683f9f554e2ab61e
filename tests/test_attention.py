"""Attention backends, remat policies and bf16 compute of the backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax.models import dit, group_attention as ga

TINY = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5,
            learn_sigma=False, max_group_size=4)


def qkv(batch=2, length=64, heads=2, head_dim=16, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.normal(k, (batch, length, heads, head_dim)) for k in keys]


def test_auto_picks_the_kernel_of_the_backend():
  assert ga.resolve_implementation('auto', jnp.float32) == 'xla'  # this CPU
  assert ga.resolve_implementation('auto', jnp.bfloat16, 'gpu') == 'cudnn'
  assert ga.resolve_implementation('auto', jnp.float32, 'gpu') == 'xla'  # cuDNN takes half precision only
  assert ga.resolve_implementation('auto', jnp.float32, 'tpu') == 'splash'
  assert ga.resolve_implementation('splash', jnp.float32, 'gpu') == 'splash'
  with pytest.raises(ValueError, match='attention_impl'):
    ga.resolve_implementation('flash', jnp.float32)


def test_splash_attention_in_the_interpreter_matches_xla():
  q, k, v = qkv()
  ref = ga.dot_product_attention(q, k, v, 'xla')
  out = ga.dot_product_attention(q, k, v, 'splash')
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
  # Gradients through the kernel's custom VJP agree too.
  loss = lambda impl: lambda q: jnp.sum(jnp.sin(ga.dot_product_attention(q, k, v, impl)))
  np.testing.assert_allclose(np.asarray(jax.grad(loss('splash'))(q)), np.asarray(jax.grad(loss('xla'))(q)),
                             atol=5e-5)


def model_inputs(batch=8):
  rng = np.random.default_rng(0)
  return (rng.standard_normal((batch, 8, 8, 3)).astype(np.float32), rng.uniform(0, 1, batch).astype(np.float32),
          rng.integers(0, 6, batch).astype(np.int32), rng.integers(0, 4, batch).astype(np.int32))


def random_params(model):
  """Every leaf random (adaLN-Zero would otherwise hide bugs): shapes from jax.eval_shape, values from NumPy (no
  initialiser or PRNG program to compile)."""
  x, t, y, ids = model_inputs()
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y, ids)['params']
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32), shapes)


@pytest.fixture(scope='module')
def params():
  """Random parameters of dit.DiT(**TINY), shared by the tests of the module."""
  return random_params(dit.DiT(**TINY))


def mean_square_loss(model):
  x, t, y, ids = model_inputs()
  return lambda p: jnp.mean(model.apply({'params': p}, x, t, y, ids, group_size=4)**2)


@pytest.fixture(scope='module')
def xla_loss_and_grads(params):
  """The plain model's (loss, gradients): the reference of every remat policy."""
  return jax.jit(jax.value_and_grad(mean_square_loss(dit.DiT(**TINY))))(params)


def test_group_attention_with_splash_equals_xla_in_the_model(params):
  x, t, y, ids = model_inputs()
  apply = lambda model: jax.jit(lambda p: model.apply({'params': p}, x, t, y, ids, group_size=4))(params)
  ref = apply(dit.DiT(**TINY))  # groups of 4*16 = 64 tokens
  out = apply(dit.DiT(**TINY, attention_impl='splash'))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize('remat', ['full', 'dots_saveable'])
def test_remat_keeps_parameter_names_outputs_and_gradients(remat, params, xla_loss_and_grads):
  x, t, y, ids = model_inputs()
  rematted = dit.DiT(**TINY, remat=remat)
  init = jax.eval_shape(rematted.init, jax.random.PRNGKey(0), x, t, y, ids)['params']
  assert jax.tree.structure(init) == jax.tree.structure(params)
  ref_loss, ref_grads = xla_loss_and_grads
  out_loss, out_grads = jax.jit(jax.value_and_grad(mean_square_loss(rematted)))(params)
  np.testing.assert_allclose(float(out_loss), float(ref_loss), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()))


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match='model.remat'):
    dit.block_class('some')


def test_bf16_compute_keeps_float32_parameters_and_stays_close(params):
  x, t, y, ids = model_inputs()
  model16 = dit.DiT(**TINY, dtype=jnp.bfloat16)
  initialised = jax.eval_shape(model16.init, jax.random.PRNGKey(0), x, t, y, ids)['params']
  assert {l.dtype for l in jax.tree.leaves(initialised)} == {jnp.dtype(jnp.float32)}
  ref = dit.DiT(**TINY).apply({'params': params}, x, t, y, ids, group_size=4)
  out = model16.apply({'params': params}, x, t, y, ids, group_size=4)
  assert out.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 0.05, rel


def sharded_worker(impl, setup=''):
  """A worker (8 fake devices, batch-sharded mesh) comparing `impl` with XLA in group attention, gradients too."""
  return f'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from groupdiff_jax import sharding
from groupdiff_jax.models import group_attention as ga
{setup}
mesh = sharding.make_mesh(None)  # data=8
q, k, v = (jax.random.normal(key, (32, 64, 2, 16)) for key in jax.random.split(jax.random.PRNGKey(0), 3))
batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(ga.group_attention(q, k, v, 4, impl)))
out = {{}}
with jax.set_mesh(mesh):
  for impl in ('xla', {impl!r}):
    run = jax.jit(jax.value_and_grad(loss(impl)), in_shardings=(batch,) * 3)
    value, grad = run(q, k, v)
    out[impl] = [float(value), np.asarray(grad).tolist()]
  hlo = jax.jit(loss({impl!r}), in_shardings=(batch,) * 3).lower(q, k, v).as_text()
out['manual'] = 'manual_computation' in hlo or 'SPMDFullToShardShape' in hlo
out['per_device_block'] = 'tensor<1x2x256x16xf32>' in hlo  # one group of 4*64 tokens per device
print('RESULT ' + json.dumps(out))
'''


def test_splash_runs_per_device_under_a_batch_sharded_mesh():
  """Under jax.set_mesh the opaque Pallas kernel is mapped over the batch axes
  (each of 8 devices attends its own group) and still equals XLA, gradients too."""
  from tests.test_sharding import run_worker
  r = run_worker(sharded_worker('splash'))
  assert r['manual'] and r['per_device_block']
  assert abs(r['splash'][0] - r['xla'][0]) < 1e-3
  np.testing.assert_allclose(np.array(r['splash'][1]), np.array(r['xla'][1]), atol=5e-5)
