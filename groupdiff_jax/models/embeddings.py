"""Conditioning embeddings of DiT/SiT and GroupDiff's sample embedding.

Parameter names follow the official DiT / GroupDiff state dict so that an
importer maps them one to one:

  TimestepEmbedder  t_embedder.mlp.{0,2}          -> t_embedder/mlp_0, mlp_2
  LabelEmbedder     y_embedder.embedding_table    -> y_embedder/embedding_table
  SampleEmbedder    sample_embedder.embedding_table
                                                  -> sample_embedder/embedding_table
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax import errors


def timestep_frequencies(t, dim=256, max_period=10000.0):
  """Sinusoidal features of (possibly fractional) timesteps, as in DiT/GLIDE.

  Args:
    t: [B] timesteps (DiT: integers in [0, 1000); SiT: floats in [0, 1]).
    dim: number of features (256 in DiT/SiT).
    max_period: lowest frequency's period.

  Returns:
    [B, dim] float32, the cosines first, then the sines.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
  return embedding


def sincos_2d_position_embedding(hidden_size, grid_size):
  """Fixed 2-D sin-cos position embedding of DiT (MAE's recipe).

  Tokens are row-major over (h, w). As in the official code (whose meshgrid
  puts w first), the first half of the channels encodes the column w and the
  second half the row h; each half is [sin(pos * omega), cos(pos * omega)].

  Returns:
    [grid_size * grid_size, hidden_size] float32 numpy array, row-major
    over (h, w) like the patch tokens.
  """
  if hidden_size % 4:
    raise errors.ConfigError(f'model.hidden_size={hidden_size} must be divisible by 4 for the 2-D sin-cos '
                             'position embedding.')

  def one_axis(dim, positions):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum('m,d->md', positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing='ij')  # [H, W] each
  embedding = np.concatenate([one_axis(hidden_size // 2, cols), one_axis(hidden_size // 2, rows)], axis=1)
  return embedding.astype(np.float32)


class TimestepEmbedder(nn.Module):
  """t -> 256 sinusoidal frequencies -> Linear -> SiLU -> Linear."""

  hidden_size: int
  frequency_embedding_size: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    """t: [B] -> [B, hidden_size]."""
    x = timestep_frequencies(t, self.frequency_embedding_size)
    init = nn.initializers.normal(0.02)
    x = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name='mlp_0')(x)
    x = nn.silu(x)
    return nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name='mlp_2')(x)


class LabelEmbedder(nn.Module):
  """Class label table with one extra row, the null class used by CFG.

  Label dropout is not done here: the train step decides which labels become
  the null class (`num_classes`), so the model stays deterministic.
  """

  num_classes: int
  hidden_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, labels):
    """labels: [B] int in [0, num_classes] (num_classes = null) -> [B, C]."""
    table = nn.Embed(self.num_classes + 1, self.hidden_size, embedding_init=nn.initializers.normal(0.02),
                     dtype=self.dtype, name='embedding_table')
    return table(labels)


class SampleEmbedder(nn.Module):
  """GroupDiff's per-member embedding, added to the adaLN conditioning.

  A learnable table [max_group_size, C] (official init normal std 0.02); the
  row of member i's id joins its conditioning: c = t_emb + y_emb + s_emb.
  """

  max_group_size: int
  hidden_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, sample_ids):
    """sample_ids: [B] int in [0, max_group_size) -> [B, C]."""
    table = nn.Embed(self.max_group_size, self.hidden_size, embedding_init=nn.initializers.normal(0.02),
                     dtype=self.dtype, name='embedding_table')
    return table(sample_ids)


def draw_sample_ids(rng, num_groups, group_size, max_group_size, fixed=False):
  """Member ids for the sample embedding, as the official GroupDiff code.

  Random (default): each group gets a random permutation of
  0..max_group_size-1 and its members take the first `group_size` entries;
  a lone image (group_size 1) therefore gets a uniformly random id.
  Fixed: member i of every group gets id i (our choice; the official fixed
  mode is only used for debugging).

  Returns:
    [num_groups * group_size] int32, members of a group contiguous.
  """
  if group_size > max_group_size:
    raise ValueError(f'group_size={group_size} exceeds model.max_group_size={max_group_size}: '
                     'the sample embedding has one row per member id.')
  if fixed:
    return jnp.tile(jnp.arange(group_size, dtype=jnp.int32), num_groups)
  keys = jax.random.split(rng, num_groups)
  perms = jax.vmap(lambda k: jax.random.permutation(k, max_group_size))(keys)  # [G, max_group_size]
  return perms[:, :group_size].reshape(-1).astype(jnp.int32)
