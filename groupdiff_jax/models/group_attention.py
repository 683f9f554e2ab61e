"""Group attention: the one change GroupDiff makes to a DiT/SiT block.

The tokens of the N members of a group, `[G*N, L, C]`, are attended as one
sequence `[G, N*L, C]` and reshaped back, so every image sees the tokens of
the other images of its group and nothing outside it. With group size 1 (or
the switch off) this is the ordinary per-image self-attention of DiT.

Members of a group are contiguous along the batch axis: rows
`g*N .. g*N + N-1` of the batch form group g. Sharding keeps whole groups on
one device (see sharding.py), so this reshape never crosses devices.

Parameter names follow timm's `Attention` as used by DiT:
`attn.qkv` ([C, 3C]: q, k, v each laid out head-major) and `attn.proj`.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax import errors
from jax.sharding import PartitionSpec as P

from groupdiff_jax.sharding import BATCH_AXES

# Attention kernels by config name (`model.attention_impl`):
#   'xla'     jax.nn.dot_product_attention in plain XLA: materialises the
#             [T, T] scores (memory ~ T^2).
#   'chunked' exact attention in blocks of CHUNK_SIZE queries per head, with
#             a flash-style backward that recomputes each block's
#             probabilities (memory ~ T per head). Any backend; written for
#             CPU, where the [T, T] softmax of 'xla' is memory-bound. A
#             sequence shorter than CHUNK_SIZE tokens uses 'xla'.
#   'cudnn'   cuDNN flash attention (GPU, bf16/fp16 only): no [T, T] matrix.
#   'splash'  Pallas splash attention (TPU; on other backends it runs in the
#             Pallas interpreter, slowly, which is how it is tested on CPU).
#   'auto'    by the platform of the target devices (target_platform: the
#             context mesh's, else the host's): cuDNN on GPU for bf16/fp16
#             compute (XLA for fp32,
#             which cuDNN does not take), splash on TPU; on CPU 'chunked'
#             for sequences of CHUNK_SIZE tokens or more and 'xla' otherwise
#             (and when the length is not given). At 256 tokens (SiT/2
#             singles, one block per head) 'chunked' took 0.6-0.75x the CPU
#             time of 'xla' (B=16, 6 heads of 64, forward + backward:
#             benchmarks/cpu_train_step.py, docs/benchmarks.md); at 16-64
#             tokens (the digits demo) its loop over heads costs more than
#             it saves. Attention forward + backward
#             on a shared 2-core CPU, fp32, 12 heads of 64: 'chunked' took
#             0.5x the time of 'xla' at T=512 (B=8), 0.4x at T=1024 (B=4)
#             and T=4096 (B=1), where its peak memory was 0.4 GB vs 4.4 GB.
# With N=16 a group is 4096 tokens: on accelerators use 'auto' (or the
# named kernel), never 'xla'.
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'chunked', 'cudnn', 'splash')

# Queries per block of 'chunked': a [256, T] float32 block of scores per head
# is 4 MiB at T=4096 (blocks of 128 to 1024 ran within 10% of each other).
CHUNK_SIZE = 256

SPLASH_MAX_BLOCK = 512


def target_platform():
  """The platform of the devices the program is built for: the context mesh's
  (`jax.set_mesh`, e.g. abstract TPU devices of an AOT compile on a CPU
  host), else JAX's default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  platform = getattr(device, 'platform', None)
  return platform or jax.default_backend()


def check_implementation(implementation):
  """ConfigError unless `implementation` is one of ATTENTION_IMPLEMENTATIONS (starts no backend)."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise errors.ConfigError(f'Unknown model.attention_impl={implementation!r}; '
                             f'choose one of {sorted(ATTENTION_IMPLEMENTATIONS)} (auto: the best for the backend).')


def resolve_implementation(implementation, dtype, backend=None, length=None):
  """The concrete kernel name for `implementation` on `backend` (default: target_platform()), for sequences of
  `length`."""
  check_implementation(implementation)
  if implementation != 'auto':
    return implementation
  backend = backend or target_platform()
  if backend in ('gpu', 'cuda', 'rocm'):
    return 'cudnn' if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else 'xla'
  if backend == 'tpu':
    return 'splash'
  return 'chunked' if length is not None and length >= CHUNK_SIZE else 'xla'


def splash_attention(q, k, v, interpret=None):
  """Pallas splash attention, full (non-causal) mask. q, k, v: [B, T, H, D].

  The kernel works per example on [H, T, D] in blocks of a multiple of 128
  tokens, and does not scale the logits: q is scaled by 1/sqrt(D) here. A
  length that is not a multiple of 128 (only tiny test models: SiT/2 groups
  are 256*N tokens) is padded with keys masked out. Head dims that are not
  a multiple of 128 (SiT-XL: 72) are zero-padded for the TPU kernel, which
  changes neither scores nor outputs.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  if interpret is None:
    interpret = target_platform() != 'tpu'
  batch, length, heads, head_dim = q.shape
  q = q * jnp.asarray(head_dim**-0.5, q.dtype)
  padded_length = -(-length // 128) * 128
  padded_dim = head_dim if interpret or head_dim % 128 == 0 else -(-head_dim // 128) * 128
  pad = ((0, 0), (0, 0), (0, padded_length - length), (0, padded_dim - head_dim))
  to_heads = lambda a: jnp.pad(a.swapaxes(1, 2), pad)  # [B, H, T', D']
  block = SPLASH_MAX_BLOCK
  while padded_length % block:
    block //= 2
  sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  if padded_length == length:
    head_mask = masks.FullMask((length, length))
  else:
    head_mask = masks.NumpyMask(np.broadcast_to(np.arange(padded_length) < length, (padded_length,) * 2).copy())
  kernel = kernels.make_splash_mha(masks.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1,
                                   q_seq_shards=1, interpret=interpret)
  out = shard_over_batch(jax.vmap(kernel))(to_heads(q), to_heads(k), to_heads(v))  # [B, H, T', D']
  return out[:, :, :length, :head_dim].swapaxes(1, 2)


def chunked_attention(q, k, v, chunk_size=None):
  """Exact softmax attention without a [T, T] matrix. q, k, v: [B, T, H, D] -> [B, T, H, D].

  Each of the B*H heads, one after the other, attends its queries in blocks
  of about `chunk_size` (default CHUNK_SIZE) against all its keys; the
  backward recomputes a block's probabilities from the saved log-sum-exp
  (flash attention's backward). Live at once: a few [chunk, T] blocks of
  scores of one head. Sequences shorter than `chunk_size` use XLA's kernel.
  """
  chunk_size = chunk_size or CHUNK_SIZE
  length = q.shape[1]
  if length < chunk_size:
    return jax.nn.dot_product_attention(q, k, v, implementation='xla')
  num_chunks = -(-length // chunk_size)
  chunk = -(-length // num_chunks)  # equal blocks: less than num_chunks padded queries

  def attend(q, k, v):
    batch, _, heads, head_dim = q.shape
    to_heads = lambda a: a.transpose(0, 2, 1, 3).reshape(batch * heads, length, head_dim)
    # Padded queries (zeros) attend harmlessly; their outputs are dropped and get no gradient.
    q = jnp.pad(to_heads(q), ((0, 0), (0, num_chunks * chunk - length), (0, 0)))
    out = _blockwise_attention(q, to_heads(k), to_heads(v), chunk)[:, :length]
    return out.reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)

  return shard_over_batch(attend)(q, k, v)


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


def shard_over_batch(fn, batch_axes=BATCH_AXES):
  """`fn` (per-example in its leading axis) run per device under the context mesh.

  A Pallas kernel is an opaque custom call: inside a jit whose batch is split
  over the mesh, XLA cannot partition it and would gather the whole batch
  onto every device. Under a context mesh (`jax.set_mesh`, which
  train_step.make_jitted_train_step sets) that has the batch axes, `fn` is
  wrapped in `jax.shard_map` over them, so each device runs the kernel on
  its own groups (whole groups per device: sharding.py). Without a context
  mesh, or with one device, `fn` is returned unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(axis for axis in batch_axes if axis in getattr(mesh, 'axis_names', ()))
  if not axes or math.prod(mesh.shape[axis] for axis in axes) == 1:
    return fn
  spec = P(axes)

  def sharded(*args):
    if args[0].shape[0] % math.prod(mesh.shape[axis] for axis in axes):
      return fn(*args)  # too few groups to split (e.g. a tiny sampling batch): XLA decides
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)

  return sharded


def dot_product_attention(q, k, v, implementation='xla'):
  """Softmax attention. q, k, v: [B, T, H, D] -> [B, T, H, D]."""
  implementation = resolve_implementation(implementation, q.dtype, length=q.shape[1])
  if implementation == 'splash':
    return splash_attention(q, k, v)
  if implementation == 'chunked':
    return chunked_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def to_groups(x, group_size):
  """[G*N, L, ...] -> [G, N*L, ...]: the members' tokens become one sequence."""
  batch, length = x.shape[:2]
  if batch % group_size:
    raise ValueError(f'Batch of {batch} images is not a whole number of groups of {group_size}.')
  return x.reshape(batch // group_size, group_size * length, *x.shape[2:])


def from_groups(x, group_size):
  """[G, N*L, ...] -> [G*N, L, ...], the inverse of `to_groups`."""
  groups, length = x.shape[:2]
  return x.reshape(groups * group_size, length // group_size, *x.shape[2:])


def group_attention(q, k, v, group_size, implementation='xla'):
  """Attention over all tokens of each group.

  Args:
    q, k, v: [G*N, L, H, D], members of a group contiguous.
    group_size: N; 1 gives per-image attention.
    implementation: one of ATTENTION_IMPLEMENTATIONS.

  Returns:
    [G*N, L, H, D].
  """
  if group_size == 1:
    return dot_product_attention(q, k, v, implementation)
  q, k, v = (to_groups(a, group_size) for a in (q, k, v))
  out = dot_product_attention(q, k, v, implementation)  # [G, N*L, H, D]
  return from_groups(out, group_size)


class GroupAttention(nn.Module):
  """Multi-head self-attention whose sequence is a whole group."""

  num_heads: int
  implementation: str = 'xla'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, group_size):
    """x: [G*N, L, C] -> [G*N, L, C]; group_size is static (1 = per image)."""
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    dense = lambda features, name: nn.Dense(
        features, kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype, name=name)
    qkv = dense(3 * width, 'qkv')(x).reshape(batch, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, D] each
    if group_size > 1:  # S_cross (evaluation/s_cross.py) reads them; a no-op unless 'intermediates' is mutable
      self.sow('intermediates', 'group_qk', (q, k))
    out = group_attention(q, k, v, group_size, self.implementation)
    return dense(width, 'proj')(out.reshape(batch, length, width))
