"""SD-VAE (diffusers `AutoencoderKL`) in Flax, NHWC throughout.

The latent space of DiT/SiT/GroupDiff: images `[B, 256, 256, 3]` in [-1, 1]
map to a diagonal Gaussian posterior with mean and log-variance
`[B, 32, 32, 4]`; latents are multiplied by `scaling_factor = 0.18215` before
the diffusion model sees them and divided by it before decoding.

Architecture (diffusers `Encoder` / `Decoder` / `AutoencoderKL`, SD 1.x
config): `block_out_channels = (128, 256, 512, 512)`, `layers_per_block = 2`
(the decoder uses 3 per block), `latent_channels = 4`, GroupNorm with 32
groups and eps 1e-6, SiLU, one single-head self-attention (scale 1/sqrt(C))
in each mid block, a downsample between encoder blocks (pad right/bottom by
one, then a 3x3 stride-2 conv without padding), an upsample between decoder
blocks (nearest x2, then a 3x3 conv), and the 1x1 `quant_conv` /
`post_quant_conv`. Submodules carry the diffusers names (`down_blocks_0`,
`resnets_1`, `to_q`, ...) so `vae_weights.py` maps the published checkpoint
onto this tree with a short rename table.

Weights. Nothing here downloads. Get `diffusion_pytorch_model.safetensors`
from the HuggingFace repositories

  * `stabilityai/sd-vae-ft-ema`: the official GroupDiff latent extraction
    encodes ImageNet with this one (and stores one posterior sample);
  * `stabilityai/sd-vae-ft-mse`: the official GroupDiff sampling decodes
    with this one;

for example `huggingface-cli download stabilityai/sd-vae-ft-mse
diffusion_pytorch_model.safetensors --local-dir /path/sd-vae-ft-mse`, then
`vae_weights.load_vae_params(path, SD_VAE_CONFIG)`. Both share the encoder
architecture and config; they differ in the fine-tuned decoder.

Precision. `dtype` is the compute dtype of convolutions, projections and
attention; parameters stay float32, every GroupNorm and the attention softmax
run in float32, and `encode` / `decode` return float32. FID is sensitive to
the decode dtype: keep float32 for final evaluation.

Usage:
  vae = AutoencoderKL(SD_VAE_CONFIG)
  params = vae_weights.load_vae_params(path, SD_VAE_CONFIG)
  latents = latents_from_images(vae, params, images, rng)   # [B, 32, 32, 4]
  images = images_from_latents(vae, params, latents)         # [B, 256, 256, 3]
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# diffusers DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an `AutoencoderKL` (the diffusers config fields)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  scaling_factor: float = 0.18215

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side (8 for SD-VAE)."""
    return 2**(len(self.block_out_channels) - 1)


# stabilityai/sd-vae-ft-ema and stabilityai/sd-vae-ft-mse.
SD_VAE_CONFIG = VAEConfig()


# ---------------------------------------------------------------- layers


def _group_norm(x, num_groups, eps, name):
  """GroupNorm computed in float32 whatever the compute dtype; returns float32."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=jnp.float32, use_fast_variance=False,
                      name=name)(x.astype(jnp.float32))


def _conv(features, kernel_size, name, dtype, precision, stride=1, padding=None):
  """Conv with PyTorch-style explicit symmetric padding (default: kernel_size // 2)."""
  pad = kernel_size // 2 if padding is None else padding
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, precision=precision, name=name)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding: [B, H, W, Cin] -> [B, H, W, Cout].

  norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the input (through a
  1x1 `conv_shortcut` when Cin != Cout).
  """
  out_channels: int
  num_groups: int = 32
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(x, self.num_groups, self.eps, 'norm1').astype(self.dtype))
    h = _conv(self.out_channels, 3, 'conv1', self.dtype, self.precision)(h)
    h = nn.silu(_group_norm(h, self.num_groups, self.eps, 'norm2').astype(self.dtype))
    h = _conv(self.out_channels, 3, 'conv2', self.dtype, self.precision)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, 'conv_shortcut', self.dtype, self.precision)(x)
    return x.astype(self.dtype) + h


class Downsample(nn.Module):
  """[B, H, W, C] -> [B, H/2, W/2, C]: pad right and bottom by 1, 3x3 conv stride 2, no padding."""
  channels: int
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # diffusers pad (0, 1, 0, 1)
    return _conv(self.channels, 3, 'conv', self.dtype, self.precision, stride=2, padding=0)(x)


class Upsample(nn.Module):
  """[B, H, W, C] -> [B, 2H, 2W, C]: nearest-neighbour x2, then a 3x3 conv."""
  channels: int
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
    return _conv(self.channels, 3, 'conv', self.dtype, self.precision)(x)


class AttentionBlock(nn.Module):
  """Single-head spatial self-attention with a residual: [B, H, W, C] -> same.

  group_norm -> to_q/to_k/to_v (C -> C) -> softmax(q k^T / sqrt(C)) v ->
  to_out_0, plus the input. Scores and softmax in float32.
  """
  num_groups: int = 32
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = _group_norm(x, self.num_groups, self.eps, 'group_norm').astype(self.dtype)
    h = h.reshape(batch, height * width, channels)  # [B, T, C]
    dense = lambda name: nn.Dense(channels, dtype=self.dtype, precision=self.precision, name=name)
    q, k, v = dense('to_q')(h), dense('to_k')(h), dense('to_v')(h)  # [B, T, C] each
    scores = jnp.einsum('bqc,bkc->bqk', q, k, precision=self.precision,
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(channels))  # [B, T, T]
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum('bqk,bkc->bqc', weights, v, precision=self.precision)  # [B, T, C]
    out = dense('to_out_0')(out).reshape(batch, height, width, channels)
    return x.astype(self.dtype) + out


class MidBlock(nn.Module):
  """diffusers UNetMidBlock2D of the VAE: resnets_0 -> attentions_0 -> resnets_1, C -> C."""
  num_groups: int = 32
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(num_groups=self.num_groups, eps=self.eps, dtype=self.dtype, precision=self.precision)
    channels = x.shape[-1]
    x = ResnetBlock(channels, name='resnets_0', **kw)(x)
    x = AttentionBlock(name='attentions_0', **kw)(x)
    return ResnetBlock(channels, name='resnets_1', **kw)(x)


class DownBlock(nn.Module):
  """diffusers DownEncoderBlock2D: `num_layers` ResnetBlocks, then an optional Downsample."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  num_groups: int = 32
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.num_groups, self.eps, self.dtype, self.precision, name=f'resnets_{j}')(x)
    if self.add_downsample:
      x = Downsample(self.out_channels, self.dtype, self.precision, name='downsamplers_0')(x)
    return x


class UpBlock(nn.Module):
  """diffusers UpDecoderBlock2D: `num_layers` ResnetBlocks, then an optional Upsample."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  num_groups: int = 32
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.num_groups, self.eps, self.dtype, self.precision, name=f'resnets_{j}')(x)
    if self.add_upsample:
      x = Upsample(self.out_channels, self.dtype, self.precision, name='upsamplers_0')(x)
    return x


# ---------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
  """Images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""
  config: VAEConfig = SD_VAE_CONFIG
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(num_groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=self.dtype, precision=self.precision)
    x = _conv(cfg.block_out_channels[0], 3, 'conv_in', self.dtype, self.precision)(x.astype(self.dtype))
    last = len(cfg.block_out_channels) - 1
    for i, channels in enumerate(cfg.block_out_channels):
      x = DownBlock(channels, cfg.layers_per_block, add_downsample=i < last, name=f'down_blocks_{i}', **kw)(x)
    x = MidBlock(name='mid_block', **kw)(x)  # [B, H/f, W/f, C_last]
    x = nn.silu(_group_norm(x, cfg.norm_num_groups, cfg.norm_eps, 'conv_norm_out').astype(self.dtype))
    return _conv(2 * cfg.latent_channels, 3, 'conv_out', self.dtype, self.precision)(x)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] (after post_quant_conv) -> images [B, h*f, w*f, out_channels]."""
  config: VAEConfig = SD_VAE_CONFIG
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    kw = dict(num_groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=self.dtype, precision=self.precision)
    x = _conv(cfg.block_out_channels[-1], 3, 'conv_in', self.dtype, self.precision)(z.astype(self.dtype))
    x = MidBlock(name='mid_block', **kw)(x)
    reversed_channels = tuple(reversed(cfg.block_out_channels))
    last = len(reversed_channels) - 1
    for i, channels in enumerate(reversed_channels):
      x = UpBlock(channels, cfg.layers_per_block + 1, add_upsample=i < last, name=f'up_blocks_{i}', **kw)(x)
    x = nn.silu(_group_norm(x, cfg.norm_num_groups, cfg.norm_eps, 'conv_norm_out').astype(self.dtype))
    return _conv(cfg.out_channels, 3, 'conv_out', self.dtype, self.precision)(x)


def sample_posterior(rng, mean, logvar):
  """One sample of the diagonal Gaussian: mean + exp(logvar / 2) * eps, eps ~ N(0, I). Shapes [B, h, w, c]."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * eps


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL: `encode`, `decode` and `sample_posterior`.

  Call through `apply`, e.g.
    mean, logvar = vae.apply({'params': params}, images, method=AutoencoderKL.encode)
    images = vae.apply({'params': params}, z, method=AutoencoderKL.decode)
  `__call__` runs both (used by `init`).
  """
  config: VAEConfig = SD_VAE_CONFIG
  dtype: Dtype = jnp.float32
  precision: Any = None

  sample_posterior = staticmethod(sample_posterior)

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.precision)
    self.decoder = Decoder(cfg, self.dtype, self.precision)
    self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, self.dtype, self.precision)
    self.post_quant_conv = _conv(cfg.latent_channels, 1, None, self.dtype, self.precision)

  def encode(self, images):
    """Images [B, H, W, 3] in [-1, 1] -> (mean, logvar), each float32 [B, H/f, W/f, latent_channels].

    logvar is clamped to LOGVAR_RANGE as in diffusers.
    """
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)  # [B, h, w, 2c]
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    """Unscaled latents [B, h, w, latent_channels] -> images float32 [B, h*f, w*f, 3] (not clipped)."""
    return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, images, rng=None):
    """Reconstruction of the posterior mean (or of a sample when rng is given): (images, mean, logvar)."""
    mean, logvar = self.encode(images)
    z = mean if rng is None else sample_posterior(rng, mean, logvar)
    return self.decode(z), mean, logvar


# ---------------------------------------------------------------- pure helpers


def latents_from_images(vae: AutoencoderKL, params, images, rng=None):
  """Images [B, H, W, 3] in [-1, 1] -> diffusion latents [B, H/8, W/8, 4], times `scaling_factor`.

  With `rng`, one posterior sample (what the official extraction stores);
  without, the posterior mean. jit with `static_argnums=0`.
  """
  mean, logvar = vae.apply({'params': params}, images, method=AutoencoderKL.encode)
  z = mean if rng is None else sample_posterior(rng, mean, logvar)
  return z * vae.config.scaling_factor


def images_from_latents(vae: AutoencoderKL, params, latents):
  """Diffusion latents [B, h, w, 4] -> images float32 [B, 8h, 8w, 3] clipped to [-1, 1].

  Divides by `scaling_factor`, then decodes. jit with `static_argnums=0`.
  """
  images = vae.apply({'params': params}, latents / vae.config.scaling_factor, method=AutoencoderKL.decode)
  return jnp.clip(images, -1.0, 1.0)
