"""An independent NumPy forward pass of the official DiT (+ GroupDiff).

Written from the official PyTorch code's definitions (timm Attention, Mlp
with tanh GELU, adaLN-Zero, MAE sin-cos position embedding, GLIDE timestep
features), in NCHW like the original, reading our Flax parameter tree. The
tests compare the Flax model against it.
"""

import math

import numpy as np


def timestep_features(t, dim=256):
  half = dim // 2
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  args = t[:, None] * freqs[None]
  return np.concatenate([np.cos(args), np.sin(args)], axis=1)


def pos_embed(dim, grid):
  # MAE: meshgrid(w, h) so the first half encodes w.
  def one(d, pos):
    omega = 1.0 / 10000**(np.arange(d // 2) / (d / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)


def linear(p, x):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)


def silu(x):
  return x / (1 + np.exp(-x))


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x):
  mu = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6)


def softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def attention(p, x, num_heads):
  """timm Attention on x [B, T, C]."""
  b, t, c = x.shape
  qkv = linear(p['qkv'], x).reshape(b, t, 3, num_heads, c // num_heads).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv  # [B, H, T, D]
  weights = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(c // num_heads))
  out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
  return linear(p['proj'], out)


def dit_forward(params, x_nchw, t, y, sample_ids, *, patch_size, num_heads, out_channels, group_size=1):
  """Official DiT forward, x [B, C, H, W] -> [B, out_channels, H, W]."""
  b, cin, h, w = x_nchw.shape
  p = patch_size
  kernel = np.asarray(params['x_embedder']['proj']['kernel'], np.float64)  # [p, p, Cin, C]
  hidden = kernel.shape[-1]
  patches = x_nchw.reshape(b, cin, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, Cin]
  tokens = patches.reshape(b, -1, p * p * cin) @ kernel.reshape(-1, hidden)
  tokens = tokens + np.asarray(params['x_embedder']['proj']['bias']) + pos_embed(hidden, h // p)[None]
  temb = linear(params['t_embedder']['mlp_2'], silu(linear(params['t_embedder']['mlp_0'], timestep_features(t))))
  c = temb + np.asarray(params['y_embedder']['embedding_table']['embedding'], np.float64)[y]
  if 'sample_embedder' in params:
    c = c + np.asarray(params['sample_embedder']['embedding_table']['embedding'], np.float64)[sample_ids]
  depth = len([k for k in params if k.startswith('blocks_')])
  for i in range(depth):
    bp = params[f'blocks_{i}']
    mod = linear(bp['adaLN_modulation_1'], silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = np.split(mod, 6, axis=1)
    hmod = layer_norm(tokens) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    # GroupDiff: "(b m) t d -> b (m t) d", attention, and back.
    seq = hmod.reshape(b // group_size, group_size * hmod.shape[1], hidden)
    att = attention(bp['attn'], seq, num_heads).reshape(b, -1, hidden)
    tokens = tokens + gate_msa[:, None] * att
    hmod = layer_norm(tokens) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    mlp = linear(bp['mlp']['fc2'], gelu_tanh(linear(bp['mlp']['fc1'], hmod)))
    tokens = tokens + gate_mlp[:, None] * mlp
  fp = params['final_layer']
  shift, scale = np.split(linear(fp['adaLN_modulation_1'], silu(c)), 2, axis=1)
  out = linear(fp['linear'], layer_norm(tokens) * (1 + scale[:, None]) + shift[:, None])
  # unpatchify: "nhwpqc->nchpwq"
  g = h // p
  out = out.reshape(b, g, g, p, p, out_channels)
  return np.einsum('nhwpqc->nchpwq', out).reshape(b, out_channels, g * p, g * p)
