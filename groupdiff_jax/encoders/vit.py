"""A plain Flax ViT image tower shared by the DINOv2 and CLIP encoders, and its weight converter.

Both towers are pre-norm ViTs: patchify (conv stride = kernel = patch),
prepend a class token, add position embeddings, `depth` blocks of
x + LS1 * Attn(LN1(x)), x + LS2 * MLP(LN2(x)) (LS = layer scale, DINOv2
only), then LN of the class token, optionally projected (CLIP). They differ
in the options of `ViTConfig` (norm eps, GELU vs quick GELU, layer scale,
patch bias, CLIP's pre-norm, the projection). Images are NHWC, already
normalised by the encoder's own preprocessing (dinov2.py, clip.py).

`convert` maps a PyTorch-layout state dict (HuggingFace safetensors) onto
the Flax tree with a declarative rename table of regular expressions
(dinov2.RULES, clip.RULES) through weights_io's engine: every key must map
or be listed as ignored, every parameter must be provided, and every shape
must match, otherwise one error names each offending key.
"""

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from groupdiff_jax import weights_io


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 224  # input side after preprocessing
  patch_size: int = 14
  hidden_size: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  norm_eps: float = 1e-6
  activation: str = 'gelu'  # 'gelu' (exact) | 'quick_gelu' (CLIP)
  layer_scale: bool = True  # DINOv2 LayerScale
  patch_bias: bool = True
  pre_norm: bool = False  # CLIP's pre_layrnorm after the embeddings
  projection_dim: int = 0  # CLIP visual_projection; 0: none

  @property
  def grid(self):
    return self.image_size // self.patch_size


def _activation(name):
  if name == 'gelu':
    return lambda x: nn.gelu(x, approximate=False)
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f'Unknown activation {name!r}.')


class Block(nn.Module):
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, D]
    cfg = self.config
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, name=name)
    norm = lambda name: nn.LayerNorm(cfg.norm_eps, dtype=jnp.float32, name=name)
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    h = norm('norm1')(x).astype(self.dtype)
    split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))  # [B, T, H, d]
    q, k, v = (split(dense(cfg.hidden_size, n)(h)) for n in ('query', 'key', 'value'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / np.sqrt(head_dim)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    h = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(x.shape[:2] + (cfg.hidden_size,))
    h = dense(cfg.hidden_size, 'out')(h)
    if cfg.layer_scale:
      h = h * self.param('layer_scale1', nn.initializers.ones, (cfg.hidden_size,))
    x = x + h.astype(x.dtype)
    h = norm('norm2')(x).astype(self.dtype)
    h = dense(cfg.hidden_size, 'fc2')(_activation(cfg.activation)(dense(cfg.mlp_dim, 'fc1')(h)))
    if cfg.layer_scale:
      h = h * self.param('layer_scale2', nn.initializers.ones, (cfg.hidden_size,))
    return x + h.astype(x.dtype)


class ViT(nn.Module):
  """Images [B, S, S, 3] (normalised) -> the image embedding [B, D] (or [B, projection_dim])."""
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    x = nn.Conv(cfg.hidden_size, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2, padding='VALID',
                use_bias=cfg.patch_bias, dtype=self.dtype, name='patch_embed')(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, cfg.hidden_size).astype(jnp.float32)  # [B, grid^2, D]
    cls = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, cfg.hidden_size))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.hidden_size)), x], 1)
    x = x + self.param('pos_embed', nn.initializers.normal(0.02), (1, 1 + cfg.grid**2, cfg.hidden_size))
    if cfg.pre_norm:
      x = nn.LayerNorm(cfg.norm_eps, name='pre_norm')(x)
    for i in range(cfg.depth):
      x = Block(cfg, self.dtype, name=f'blocks_{i}')(x)
    out = nn.LayerNorm(cfg.norm_eps, name='norm')(x[:, 0])  # [B, D]
    if cfg.projection_dim:
      out = nn.Dense(cfg.projection_dim, use_bias=False, name='projection')(out)
    return out.astype(jnp.float32)


# ---------------------------------------------------------------- weight conversion


def convert(state, config, rules, ignore=(), what='ViT', weights_path=''):
  """PyTorch-layout state dict -> Flax params of ViT(config), by weights_io's engine.

  Args:
    state: {key: array}.
    rules: [(regex, flax path template with \\1 groups, weights_io.Layout or transform(array, config))]; a
      transform may change the shape (DINOv2's position table for another grid).
    ignore: regexes of keys consumed without use (text tower, buffers).
    what: the tower's name in errors.
    weights_path: the file the state came from, named in errors ('' for none).

  Raises:
    weights_io.WeightsImportError: unknown keys, missing params, or shapes
      that do not match (naming the file and every key).
  """
  expected = weights_io.param_shapes(ViT(config).init, jnp.zeros((1, config.image_size, config.image_size, 3)))
  rows = [(pattern, template, layout if isinstance(layout, weights_io.Layout) else
           weights_io.custom(lambda w, transform=layout: transform(w, config)))
          for pattern, template, layout in rules]
  flat, _ = weights_io.import_state_dict(
      state, expected, weights_io.table_locator(rows), ignore=[(p, 'not used') for p in ignore],
      header=f'State dict{weights_io.source_label(weights_path)} does not match {what} {config}:')
  return weights_io.unflatten(flat)


def weights_file(path):
  """`path` itself, or `model.safetensors` inside a directory (HuggingFace layout)."""
  path = epath.Path(path)
  return os.fspath(path / 'model.safetensors' if path.is_dir() else path)


def read_safetensors(path, what, where):
  """The state dict of a tower's weights file (or its directory); errors name the file and say `where`."""
  return weights_io.read_arrays(weights_file(path), f'{what} weights: {where}')


def resize_bicubic_torch(grid, size):
  """PyTorch F.interpolate(mode='bicubic', align_corners=False, antialias=False) of [h, w, C] to [size, size, C].

  Cubic convolution with a = -0.75 and clamped borders, separable; what
  HuggingFace DINOv2 does to its position embeddings for another grid.
  """
  def matrix(n_in, n_out):
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    base = np.floor(src)
    t = src - base
    a = -0.75
    weights = np.stack([((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                        ((a + 2) * t - (a + 3)) * t * t + 1,
                        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a], 1)  # [n_out, 4]
    out = np.zeros((n_out, n_in))
    for tap in range(4):
      idx = np.clip(base.astype(int) - 1 + tap, 0, n_in - 1)
      np.add.at(out, (np.arange(n_out), idx), weights[:, tap])
    return out
  grid = np.asarray(grid, np.float64)
  rows, cols = matrix(grid.shape[0], size), matrix(grid.shape[1], size)
  return np.einsum('ih,jw,hwc->ijc', rows, cols, grid).astype(np.float32)
