"""The 'chunked' attention kernels: exact softmax attention without a [T, T] matrix, written for CPU.

`attention` is what `group_attention.chunked_attention` runs on each
device's examples (models/group_attention.py chooses the kernel and maps it
over a mesh). Two kernels, both with a flash-style backward that recomputes
the probabilities from the saved log-sum-exp instead of keeping them:

- per head in blocks (`_blockwise_attention`): the B*H heads one after the
  other, each attending its queries in blocks of about `chunk_size` against
  all its keys; live at once: a few [chunk, T] blocks of scores of one head.
- per example (`_rowwise_attention`), for a sequence of exactly one block
  (SiT/2 singles at CHUNK_SIZE 256): one example at a time, all its heads at
  once, in the [T, H, D] layout the qkv projection gives (no [B*H, T, D]
  copies); a few [H, T, T] blocks live. Forward + backward, B=16, T=256, 6
  heads of 64, fp32: 0.75x the CPU time of the per-head kernel; at T=1024 it
  took 1.1-1.2x, so longer sequences stay per head (docs/benchmarks.md).
"""

import functools

import jax
import jax.numpy as jnp


def attention(q, k, v, chunk_size):
  """q: [B, T, H, D], k, v: [B, T, H, D] -> [B, T, H, D]; T >= chunk_size."""
  length = q.shape[1]
  if length == chunk_size:
    return _rowwise_attention(q, k, v)
  num_chunks = -(-length // chunk_size)
  chunk = -(-length // num_chunks)  # equal blocks: less than num_chunks padded queries
  batch, _, heads, head_dim = q.shape
  to_heads = lambda a: a.transpose(0, 2, 1, 3).reshape(batch * heads, a.shape[1], head_dim)
  # Padded queries (zeros) attend harmlessly; their outputs are dropped and get no gradient.
  q = jnp.pad(to_heads(q), ((0, 0), (0, num_chunks * chunk - length), (0, 0)))
  out = _blockwise_attention(q, to_heads(k), to_heads(v), chunk)[:, :length]
  return out.reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise_attention(q, k, v, chunk):
  """q: [BH, n*chunk, D], k, v: [BH, T, D] -> [BH, n*chunk, D]."""
  return _blockwise_forward(q, k, v, chunk)[0]


def _blockwise_forward(q, k, v, chunk):
  q = q * jnp.asarray(q.shape[-1]**-0.5, q.dtype)

  def head(args):
    q, k, v = args

    def block(q):  # [chunk, D]
      s = jnp.einsum('qd,kd->qk', q, k, preferred_element_type=jnp.float32)
      m = jnp.max(s, axis=-1, keepdims=True)
      p = jnp.exp(s - m)
      l = jnp.sum(p, axis=-1, keepdims=True)
      o = jnp.einsum('qk,kd->qd', p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
      return o.astype(v.dtype), (m + jnp.log(l))[:, 0]

    o, lse = jax.lax.map(block, q.reshape(-1, chunk, q.shape[-1]))
    return o.reshape(q.shape), lse.reshape(-1)

  out, lse = jax.lax.map(head, (q, k, v))
  return out, (q, k, v, out, lse)


def _blockwise_backward(chunk, residuals, d_out):
  q, k, v, out, lse = residuals  # q already scaled by 1/sqrt(D)
  f32 = jnp.float32

  def head(args):
    q, k, v, out, lse, d_out = args
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # [T']

    def block(carry, xs):
      dk_t, dv_t = carry
      q, lse, delta, d_out = xs
      p = jnp.exp(jnp.einsum('qd,kd->qk', q, k, preferred_element_type=f32) - lse[:, None])
      dp = jnp.einsum('qd,kd->qk', d_out, v, preferred_element_type=f32)
      ds = (p * (dp - delta[:, None])).astype(q.dtype)
      dq = jnp.einsum('qk,kd->qd', ds, k, preferred_element_type=f32)
      # dk, dv accumulate transposed, [D, T]: XLA CPU runs 'qd,qk->dk' ~3x faster than 'qk,qd->kd'.
      dk_t += jnp.einsum('qd,qk->dk', q, ds, preferred_element_type=f32)
      dv_t += jnp.einsum('qd,qk->dk', d_out, p.astype(d_out.dtype), preferred_element_type=f32)
      return (dk_t, dv_t), dq

    blocks = lambda a: a.reshape(-1, chunk, *a.shape[1:])
    zeros = jnp.zeros(k.shape[::-1], f32)
    (dk_t, dv_t), dq = jax.lax.scan(block, (zeros, zeros), tuple(map(blocks, (q, lse, delta, d_out))))
    return dq.reshape(q.shape), dk_t.T, dv_t.T

  dq, dk, dv = jax.lax.map(head, (q, k, v, out, lse, d_out))
  return (dq * q.shape[-1]**-0.5).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blockwise_attention.defvjp(_blockwise_forward, _blockwise_backward)


@jax.custom_vjp
def _rowwise_attention(q, k, v):
  """q, k, v: [B, T, H, D] -> [B, T, H, D], one example (all its heads) at a time."""
  return _rowwise_forward(q, k, v)[0]


def _rowwise_forward(q, k, v):
  q = q * jnp.asarray(q.shape[-1]**-0.5, q.dtype)

  def row(args):  # [T, H, D] each
    q, k, v = args
    s = jnp.einsum('qhd,khd->hqk', q, k, preferred_element_type=jnp.float32)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum('hqk,khd->hqd', p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
    return o.transpose(1, 0, 2).astype(v.dtype), (m + jnp.log(l))[:, :, 0].T  # [T, H, D], [T, H]

  out, lse = jax.lax.map(row, (q, k, v))
  return out, (q, k, v, out, lse)


def _rowwise_backward(residuals, d_out):
  q, k, v, out, lse = residuals  # q already scaled by 1/sqrt(D)
  f32 = jnp.float32

  def row(args):
    q, k, v, out, lse, d_out = args
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # [T, H]
    p = jnp.exp(jnp.einsum('qhd,khd->hqk', q, k, preferred_element_type=f32) - lse.T[:, :, None])
    dp = jnp.einsum('qhd,khd->hqk', d_out, v, preferred_element_type=f32)
    ds = (p * (dp - delta.T[:, :, None])).astype(q.dtype)
    dq = jnp.einsum('hqk,khd->qhd', ds, k, preferred_element_type=f32)
    # dk, dv come out [H, D, T] (the 'qd,qk->dk' form, as in _blockwise_backward), then [T, H, D].
    dk = jnp.einsum('qhd,hqk->hdk', q, ds, preferred_element_type=f32).transpose(2, 0, 1)
    dv = jnp.einsum('qhd,hqk->hdk', d_out, p.astype(d_out.dtype), preferred_element_type=f32).transpose(2, 0, 1)
    return dq, dk, dv

  dq, dk, dv = jax.lax.map(row, (q, k, v, out, lse, d_out))
  return (dq * q.shape[-1]**-0.5).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_rowwise_attention.defvjp(_rowwise_forward, _rowwise_backward)
