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

import flax.linen as nn
import jax
import jax.numpy as jnp

# Kernels for jax.nn.dot_product_attention by config name. 'auto' lets JAX
# choose (cuDNN flash attention on GPU where it applies); 'xla' materialises
# the [T, T] score matrix and is what runs on CPU.
ATTENTION_IMPLEMENTATIONS = {'auto': None, 'xla': 'xla', 'cudnn': 'cudnn'}


def dot_product_attention(q, k, v, implementation='xla'):
  """Softmax attention. q, k, v: [B, T, H, D] -> [B, T, H, D]."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'Unknown model.attention_impl={implementation!r}; '
                     f'choose one of {sorted(ATTENTION_IMPLEMENTATIONS)}.')
  return jax.nn.dot_product_attention(q, k, v, implementation=ATTENTION_IMPLEMENTATIONS[implementation])


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
    implementation: a key of ATTENTION_IMPLEMENTATIONS.

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
