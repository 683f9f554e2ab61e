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

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from groupdiff_jax.sharding import BATCH_AXES

# Attention kernels by config name (`model.attention_impl`):
#   'xla'    jax.nn.dot_product_attention in plain XLA: materialises the
#            [T, T] scores (memory ~ T^2). What runs on CPU.
#   'cudnn'  cuDNN flash attention (GPU, bf16/fp16 only): no [T, T] matrix.
#   'splash' Pallas splash attention (TPU; on other backends it runs in the
#            Pallas interpreter, slowly, which is how it is tested on CPU).
#   'auto'   by backend: cuDNN on GPU for bf16/fp16 compute (XLA for fp32,
#            which cuDNN does not take), splash on TPU, XLA on CPU.
# With N=16 a group is 4096 tokens: on accelerators use 'auto' (or the
# named kernel), never 'xla'.
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'splash')

SPLASH_MAX_BLOCK = 512


def resolve_implementation(implementation, dtype, backend=None):
  """The concrete kernel name for `implementation` on `backend` (default: JAX's)."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'Unknown model.attention_impl={implementation!r}; '
                     f'choose one of {sorted(ATTENTION_IMPLEMENTATIONS)}.')
  if implementation != 'auto':
    return implementation
  backend = backend or jax.default_backend()
  if backend in ('gpu', 'cuda', 'rocm'):
    return 'cudnn' if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else 'xla'
  if backend == 'tpu':
    return 'splash'
  return 'xla'


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
    interpret = jax.default_backend() != 'tpu'
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
  implementation = resolve_implementation(implementation, q.dtype)
  if implementation == 'splash':
    return splash_attention(q, k, v)
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
    out = group_attention(q, k, v, group_size, self.implementation)
    return dense(width, 'proj')(out.reshape(batch, length, width))
