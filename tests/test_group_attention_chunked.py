"""The 'chunked' attention kernel: equal to XLA's, gradients too, in blocks of queries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax.models import dit, group_attention as ga
from tests.test_attention import TINY, model_inputs, sharded_worker


def qkv(batch=2, length=100, heads=3, head_dim=16, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.normal(key, (batch, length, heads, head_dim), dtype) for key in keys]


@pytest.fixture
def small_chunks(monkeypatch):
  """Blocks of 16 queries, so the tiny test sequences really are split."""
  monkeypatch.setattr(ga, 'CHUNK_SIZE', 16)


def sin_loss(attention):
  return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))


def xla(q, k, v):
  return ga.dot_product_attention(q, k, v, 'xla')


@pytest.mark.parametrize('length', [100, 96, 16])  # 100: 7 blocks of 15 (5 padded queries); 16: one block
def test_chunked_equals_xla_and_so_do_its_gradients(length):
  q, k, v = qkv(length=length)
  chunked = lambda q, k, v: ga.chunked_attention(q, k, v, chunk_size=16)
  np.testing.assert_allclose(np.asarray(chunked(q, k, v)), np.asarray(xla(q, k, v)), atol=2e-6)
  grads = jax.jit(jax.grad(sin_loss(chunked), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.jit(jax.grad(sin_loss(xla), argnums=(0, 1, 2)))(q, k, v)
  for grad, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref), atol=5e-6)


def test_short_sequences_use_the_xla_kernel():
  q, k, v = qkv(length=15)
  np.testing.assert_array_equal(np.asarray(ga.chunked_attention(q, k, v, chunk_size=16)), np.asarray(xla(q, k, v)))


def test_group_attention_with_chunked_equals_xla(small_chunks):
  q, k, v = qkv(batch=8, length=24, heads=2, head_dim=8)  # 2 groups of 4 images: 96 tokens, 6 blocks
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(ga.group_attention(q, k, v, 4, impl)))
  value, grads = jax.jit(jax.value_and_grad(loss('chunked'), argnums=(0, 1, 2)))(q, k, v)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(loss('xla'), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
  for grad, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref), atol=5e-6)


def test_group_size_one_is_per_image_attention(small_chunks):
  q, k, v = qkv(batch=3, length=40)
  out = ga.group_attention(q, k, v, 1, 'chunked')
  for i in range(3):
    np.testing.assert_allclose(np.asarray(out[i]), np.asarray(xla(q[i:i + 1], k[i:i + 1], v[i:i + 1])[0]),
                               atol=2e-6)


def test_chunked_under_jit_equals_eager(small_chunks):
  q, k, v = qkv()
  run = jax.jit(ga.dot_product_attention, static_argnames='implementation')
  np.testing.assert_allclose(np.asarray(run(q, k, v, implementation='chunked')),
                             np.asarray(ga.dot_product_attention(q, k, v, 'chunked')), atol=1e-6)


def test_chunked_in_the_model_with_remat_equals_xla(small_chunks):
  tiny = dict(TINY, depth=1)
  x, t, y, ids = model_inputs()
  shapes = jax.eval_shape(dit.DiT(**tiny).init, jax.random.PRNGKey(0), x, t, y, ids)['params']
  rng = np.random.default_rng(1)  # adaLN-Zero starts at zero: random weights so every path does work
  params = jax.tree.map(lambda p: 0.3 * rng.standard_normal(p.shape).astype(np.float32), shapes)

  def loss(model):  # groups of 4 images of 16 tokens: 64 tokens, 4 blocks
    return lambda p: jnp.mean(model.apply({'params': p}, x, t, y, ids, group_size=4)**2)

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss(dit.DiT(**tiny))))(params)
  out_loss, out_grads = jax.jit(jax.value_and_grad(loss(dit.DiT(**tiny, attention_impl='chunked', remat='full'))))(
      params)
  np.testing.assert_allclose(float(out_loss), float(ref_loss), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()))


def test_chunked_in_bfloat16_is_close_to_xla():
  q, k, v = qkv(dtype=jnp.bfloat16)
  out = ga.chunked_attention(q, k, v, chunk_size=16)
  assert out.dtype == jnp.bfloat16
  ref = xla(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2)


def test_backward_keeps_no_score_matrix():
  q, k, v = qkv(batch=1, length=2048, heads=2, head_dim=16)
  temp = {}
  for name, attention in (('xla', xla), ('chunked', lambda q, k, v: ga.chunked_attention(q, k, v, chunk_size=128))):
    step = jax.jit(jax.grad(sin_loss(attention), argnums=(0, 1, 2))).lower(q, k, v).compile()
    temp[name] = step.memory_analysis().temp_size_in_bytes
  scores = 2 * 2048 * 2048 * 4  # [H, T, T] float32: 32 MiB
  assert temp['xla'] >= scores and temp['chunked'] < scores / 4, temp


def test_auto_picks_chunked_on_cpu_from_one_full_block():
  assert ga.resolve_implementation('auto', jnp.float32) == 'xla'
  assert ga.resolve_implementation('auto', jnp.float32, length=ga.CHUNK_SIZE - 1) == 'xla'
  assert ga.resolve_implementation('auto', jnp.float32, length=ga.CHUNK_SIZE) == 'chunked'
  assert ga.resolve_implementation('auto', jnp.float32, 'cpu', length=4096) == 'chunked'
  assert ga.resolve_implementation('auto', jnp.bfloat16, 'gpu', length=4096) == 'cudnn'
  assert ga.resolve_implementation('auto', jnp.float32, 'tpu', length=4096) == 'splash'
  assert ga.resolve_implementation('chunked', jnp.float32, 'gpu') == 'chunked'


def test_unknown_implementation_still_errors():
  q, k, v = qkv(length=8)
  with pytest.raises(ValueError, match='attention_impl'):
    ga.resolve_implementation('flash', jnp.float32, length=4096)
  with pytest.raises(ValueError, match='attention_impl'):
    ga.dot_product_attention(q, k, v, 'flash')


def test_chunked_runs_per_device_under_a_batch_sharded_mesh():
  from tests.test_sharding import run_worker
  r = run_worker(sharded_worker('chunked', setup='ga.CHUNK_SIZE = 64'))
  assert r['manual']
  assert abs(r['chunked'][0] - r['xla'][0]) < 1e-3
  np.testing.assert_allclose(np.array(r['chunked'][1]), np.array(r['xla'][1]), atol=5e-5)
