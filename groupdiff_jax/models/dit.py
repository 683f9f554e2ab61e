"""DiT / SiT backbone (one architecture) with GroupDiff's group attention.

Exactly the official DiT architecture: patchify conv, fixed 2-D sin-cos
position embedding, 256-frequency timestep MLP, label table with a null
class, adaLN-Zero blocks (zero-initialised modulation and final layer),
optional learned sigma. GroupDiff adds two things: attention over the group
(models/group_attention.py) and the sample embedding
(models/embeddings.py). SiT is the same network trained with a different
objective (transport.py), so `SiT-XL/2` and `DiT-XL/2` name the same shape.

Layout is NHWC: images/latents are `[B, H, W, C]` with B = G*N, the N
members of each group contiguous.

Parameter tree -> official state-dict keys (the importer maps them 1:1):
  x_embedder/proj                 x_embedder.proj
  t_embedder/mlp_0, mlp_2         t_embedder.mlp.0, .2
  y_embedder/embedding_table      y_embedder.embedding_table
  sample_embedder/embedding_table sample_embedder.embedding_table
  blocks_{i}/attn/qkv, attn/proj  blocks.{i}.attn.qkv, .proj
  blocks_{i}/mlp/fc1, mlp/fc2     blocks.{i}.mlp.fc1, .fc2
  blocks_{i}/adaLN_modulation_1   blocks.{i}.adaLN_modulation.1
  final_layer/linear, adaLN_modulation_1
`pos_embed` is a fixed constant here, not a parameter.

Time conventions (`time_convention`, see `network_time`): 'sit' is ours
(willisma/SiT: t = 0 noise, t = 1 data, prediction = data - noise).
'groupdiff_official' runs a network trained the other way, as the official
GroupDiff SiT (and REPA's SiT, which it resumes from): its time s = 1 - t
(s = 1 noise) and its velocity is noise - data. The model then feeds the
network 1 - t and negates its data channels, so that every caller (trainer,
samplers, guidance) sees our convention.
"""

import dataclasses
import re
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax import errors
from groupdiff_jax.models import embeddings
from groupdiff_jax.models.dense import dense_dot_general
from groupdiff_jax.models.group_attention import GroupAttention, check_implementation

# Official DiT sizes: name -> (depth, hidden_size, num_heads).
MODEL_SIZES = {
    'S': (12, 384, 6),
    'B': (12, 768, 12),
    'L': (24, 1024, 16),
    'XL': (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
TIME_CONVENTIONS = ('sit', 'groupdiff_official')


def parse_variant(name):
  """'SiT-XL/2' or 'DiT-B/4' -> dict(depth, hidden_size, num_heads, patch_size)."""
  match = re.fullmatch(r'(?:DiT|SiT)-(S|B|L|XL)/(\d+)', name)
  if not match or int(match.group(2)) not in PATCH_SIZES:
    raise errors.ConfigError(f'Unknown model variant {name!r}: expected "SiT-<S|B|L|XL>/<2|4|8>" '
                             '(or DiT-...), e.g. "SiT-XL/2".')
  depth, hidden_size, num_heads = MODEL_SIZES[match.group(1)]
  return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=int(match.group(2)))


def network_time(t, convention):
  """Our SiT time t [B] (0 = noise, 1 = data) -> the time the network was trained on.

  'groupdiff_official': s = 1 - t (official GroupDiff / REPA SiT: s = 1 is
  noise; their timestep embedder takes s in [0, 1] unscaled, as ours).
  """
  if convention == 'sit':
    return t
  if convention == 'groupdiff_official':
    return 1.0 - t
  raise ValueError(f'Unknown model.time_convention={convention!r}; choose one of {TIME_CONVENTIONS}.')


def prediction_from_network(out, convention, data_channels):
  """Network output [B, H, W, C'] -> our prediction (velocity = data - noise).

  'groupdiff_official' networks predict noise - data: the first
  data_channels channels are negated (d/dt = -d/ds for s = 1 - t); channels
  after them (learned-sigma values, if any) are left as they are.
  """
  if convention == 'sit':
    return out
  if convention == 'groupdiff_official':
    return jnp.concatenate([-out[..., :data_channels], out[..., data_channels:]], axis=-1)
  raise ValueError(f'Unknown model.time_convention={convention!r}; choose one of {TIME_CONVENTIONS}.')


def modulate(x, shift, scale):
  """adaLN: x [B, L, C], shift/scale [B, C]."""
  return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm():
  # No affine parameters (adaLN supplies them); computed in float32 so that
  # bf16 activations do not lose the statistics.
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=jnp.float32)


def _xavier_dense(features, name, dtype, zero=False):
  init = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, kernel_init=init, dtype=dtype, dot_general=dense_dot_general, name=name)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> tokens, a strided conv as in timm."""
  hidden_size: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, C_in] -> [B, (H/p)*(W/p), hidden_size], row-major."""
    p = self.patch_size
    # Initialised like a Linear on the flattened patch, as the official code.
    init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=-1)
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID', kernel_init=init,
                dtype=self.dtype, name='proj')(x)
    return x.reshape(x.shape[0], -1, self.hidden_size)


@jax.custom_vjp
def gelu_tanh(x):
  """GELU, tanh approximation (timm's GELU(approximate='tanh')); its value is `nn.gelu(x, approximate=True)`.

  The gradient recomputes tanh from x: differentiated by JAX, the forward
  pass would also write tanh(.) out for the backward (a second pass over the
  [tokens, 4C] activations, and 4C floats per token kept) where x is kept
  anyway.
  """
  return nn.gelu(x, approximate=True)


def _gelu_forward(x):
  return gelu_tanh(x), x


def _gelu_backward(x, d_out):
  s, a = np.sqrt(2 / np.pi).astype(x.dtype), np.asarray(0.044715, x.dtype)
  t = jnp.tanh(s * (x + a * x**3))
  return (d_out * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * s * (1 + 3 * a * x * x)),)


gelu_tanh.defvjp(_gelu_forward, _gelu_backward)


class Mlp(nn.Module):
  """fc1 -> GELU(tanh) -> fc2, per token."""
  hidden_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = gelu_tanh(_xavier_dense(self.hidden_features, 'fc1', self.dtype)(x))
    return _xavier_dense(width, 'fc2', self.dtype)(x)


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block whose attention spans the group."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  attention_impl: str = 'xla'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, group_size):
    """x: [G*N, L, C] tokens, c: [G*N, C] conditioning -> [G*N, L, C]."""
    modulation = _xavier_dense(6 * self.hidden_size, 'adaLN_modulation_1', self.dtype, zero=True)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)
    h = modulate(_layer_norm()(x), shift_msa, scale_msa).astype(self.dtype)
    h = GroupAttention(self.num_heads, self.attention_impl, self.dtype, name='attn')(h, group_size)
    x = x + gate_msa[:, None] * h
    h = modulate(_layer_norm()(x), shift_mlp, scale_mlp).astype(self.dtype)
    h = Mlp(int(self.hidden_size * self.mlp_ratio), self.dtype, name='mlp')(h)
    return x + gate_mlp[:, None] * h


class FinalLayer(nn.Module):
  patch_size: int
  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    """x: [B, L, C], c: [B, C] -> [B, L, p*p*out_channels]."""
    modulation = _xavier_dense(2 * x.shape[-1], 'adaLN_modulation_1', self.dtype, zero=True)(nn.silu(c))
    shift, scale = jnp.split(modulation, 2, axis=-1)
    x = modulate(_layer_norm()(x), shift, scale).astype(self.dtype)
    return _xavier_dense(self.patch_size**2 * self.out_channels, 'linear', self.dtype, zero=True)(x)


# Activation rematerialisation of each block (`model.remat`): what the
# backward pass keeps from the forward. 'none': everything (fastest, most
# memory); 'full': only the block inputs, the block is recomputed (about one
# extra forward, least memory); 'dots_saveable': matmul outputs kept,
# element-wise ops recomputed (a middle ground).
REMAT_POLICIES = {
    'none': None,
    'full': lambda: None,
    'dots_saveable': lambda: jax.checkpoint_policies.dots_saveable,
}


def block_class(remat):
  """DiTBlock, wrapped in nn.remat per `remat` (parameter names unchanged)."""
  if remat not in REMAT_POLICIES:
    raise errors.ConfigError(f'Unknown model.remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}.')
  if remat == 'none':
    return DiTBlock
  # static_argnums counts `self`: (self, x, c, group_size) -> group_size is 3.
  return nn.remat(DiTBlock, policy=REMAT_POLICIES[remat](), static_argnums=(3,))


@dataclasses.dataclass(frozen=True)
class GroupAttentionSwitch:
  """Which blocks attend across the group: blocks [start, stop) (None = all)."""
  start: int = 0
  stop: Optional[int] = None

  def __contains__(self, layer):
    return layer >= self.start and (self.stop is None or layer < self.stop)


class DiT(nn.Module):
  """DiT/SiT denoiser with group attention and a sample embedding.

  Attributes:
    input_size: latent height = width (32 for 256px SD-VAE latents).
    in_channels: latent channels (4).
    patch_size, hidden_size, depth, num_heads, mlp_ratio: the architecture.
    num_classes: class count; label `num_classes` is the null class.
    learn_sigma: output 2*in_channels (epsilon and variance values).
    max_group_size: rows of the sample embedding table; 0 removes it.
    group_layers: (start, stop) block range with group attention; None = all.
    attention_impl: one of group_attention.ATTENTION_IMPLEMENTATIONS.
    dtype: compute dtype (parameters stay float32).
    remat: a key of REMAT_POLICIES.
    time_convention: one of TIME_CONVENTIONS: how the network's own time and
      output relate to ours (module docstring; `network_time`,
      `prediction_from_network`). Callers always pass our t and get our
      prediction.
  """

  input_size: int = 32
  in_channels: int = 4
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  learn_sigma: bool = True
  max_group_size: int = 4
  group_layers: Optional[Tuple[int, Optional[int]]] = None
  attention_impl: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  remat: str = 'none'
  time_convention: str = 'sit'

  @property
  def out_channels(self):
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @nn.compact
  def __call__(self, x, t, y, sample_ids=None, *, group_size=1, group_attention=True):
    """Predict the model output for every member of every group.

    Args:
      x: [G*N, H, W, in_channels] noisy inputs, members of a group contiguous.
      t: [G*N] timesteps (each member may have its own), in our convention.
      y: [G*N] int labels, `num_classes` for the null class.
      sample_ids: [G*N] int member ids in [0, max_group_size); required when
        max_group_size > 0, ignored otherwise.
      group_size: N, static. 1 gives the baseline DiT/SiT.
      group_attention: static switch; False attends per image in every block
        (a sampler turns it off for part of the trajectory).

    Returns:
      [G*N, H, W, out_channels].
    """
    batch, height, width, _ = x.shape
    p = self.patch_size
    if height != self.input_size or width != self.input_size:
      raise errors.ConfigError(f'The input is {height}x{width} but model.input_size={self.input_size}: set '
                               'model.input_size to the resolution of the data (images or latents).')
    tokens = PatchEmbed(self.hidden_size, p, self.dtype, name='x_embedder')(x)  # [B, L, C]
    grid = self.input_size // p
    tokens = tokens + embeddings.sincos_2d_position_embedding(self.hidden_size, grid)[None]

    t = network_time(t, self.time_convention)
    c = embeddings.TimestepEmbedder(self.hidden_size, dtype=self.dtype, name='t_embedder')(t)
    c = c + embeddings.LabelEmbedder(self.num_classes, self.hidden_size, self.dtype, name='y_embedder')(y)
    if self.max_group_size > 0:
      if sample_ids is None:
        raise ValueError('model.max_group_size > 0 needs sample_ids (see embeddings.draw_sample_ids).')
      c = c + embeddings.SampleEmbedder(self.max_group_size, self.hidden_size, self.dtype,
                                        name='sample_embedder')(sample_ids)  # [B, C]

    switch = GroupAttentionSwitch(*(self.group_layers or (0, None)))
    block = block_class(self.remat)
    for layer in range(self.depth):
      block_group_size = group_size if (group_attention and layer in switch) else 1
      tokens = block(self.hidden_size, self.num_heads, self.mlp_ratio, self.attention_impl, self.dtype,
                        name=f'blocks_{layer}')(tokens, c, block_group_size)
    out = FinalLayer(p, self.out_channels, self.dtype, name='final_layer')(tokens, c)  # [B, L, p*p*out]
    out = out.reshape(batch, grid, grid, p, p, self.out_channels)
    out = out.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * p, grid * p, self.out_channels)
    return prediction_from_network(out.astype(jnp.float32), self.time_convention, self.in_channels)


def check_time_convention(config):
  """'groupdiff_official' only for what it maps exactly: SiT, velocity, linear or GVP path.

  (Their paths at s = 1 - t are ours; a noise or score network would need
  no negation, VP paths differ, DiT uses integer DDPM steps.)
  """
  convention = config.time_convention
  if convention not in TIME_CONVENTIONS:
    raise errors.ConfigError(f'Unknown model.time_convention={convention!r}; choose one of {TIME_CONVENTIONS}.')
  if convention == 'groupdiff_official':
    found = dict(objective=config.objective, prediction=config.prediction, path=config.path)
    if found['objective'] != 'sit' or found['prediction'] != 'velocity' or found['path'] not in ('linear', 'gvp'):
      raise errors.ConfigError(f'model.time_convention=groupdiff_official maps the official GroupDiff/REPA SiT '
                               f'(velocity on the linear or GVP path) onto ours; the config has {found}. Use '
                               f'model.time_convention=sit for other models.')
  return convention


def model_from_config(config):
  """Build a DiT from the `model` section of a config (ml_collections)."""
  arch = parse_variant(config.variant)
  overrides = {k: config[k] for k in ('depth', 'hidden_size', 'num_heads') if config[k]}
  arch.update(overrides)
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if config.dtype not in dtypes:
    raise errors.ConfigError(f'Unknown model.dtype={config.dtype!r}; choose one of {sorted(dtypes)}.')
  dtype = dtypes[config.dtype]
  check_implementation(config.attention_impl)  # here, not inside a jit
  block_class(config.remat)
  group_layers = tuple(config.group_layers) if config.group_layers else None
  return DiT(input_size=config.input_size, in_channels=config.in_channels, num_classes=config.num_classes,
             learn_sigma=config.learn_sigma, max_group_size=config.max_group_size, group_layers=group_layers,
             attention_impl=config.attention_impl, mlp_ratio=config.mlp_ratio,
             dtype=dtype, remat=config.remat, time_convention=check_time_convention(config), **arch)
