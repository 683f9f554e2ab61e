"""Published SD-VAE weights (diffusers safetensors) -> Flax params of `vae.AutoencoderKL`. No torch.

Where to get them: `diffusion_pytorch_model.safetensors` of the HuggingFace
repositories `stabilityai/sd-vae-ft-ema` (the official GroupDiff latent
extraction) and `stabilityai/sd-vae-ft-mse` (the official GroupDiff decoding),
e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema
diffusion_pytorch_model.safetensors --local-dir /path/sd-vae-ft-ema`.

The mapping is declarative:
  * `_PATH_RULES` rename a diffusers module path to ours (older checkpoints
    call the mid-block attention projections `query/key/value/proj_attn`,
    newer ones `to_q/to_k/to_v/to_out.0`; both are accepted, not both at once);
  * `_LAYER_KIND` says from the module's last name whether it is a conv, a
    linear or a GroupNorm;
  * `_LEAF_RULES` map (kind, `weight`|`bias`) to the Flax leaf and the layout
    change: conv OIHW -> HWIO, linear [out, in] -> [in, out] (also accepted
    as a 1x1 conv [out, in, 1, 1]), norm weight -> scale.
Every key of the file must land on a distinct leaf of `jax.eval_shape` of the
module's init with the expected shape, and every leaf must be filled; all
problems are reported together in one `VAEWeightsError`, naming the keys.
"""

import os
import re
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax import errors, weights_io
from groupdiff_jax.encoders import vae as vae_lib

WEIGHTS_FILENAME = 'diffusion_pytorch_model.safetensors'
HF_REPOS = {
    'stabilityai/sd-vae-ft-ema': 'latent extraction in the official GroupDiff code',
    'stabilityai/sd-vae-ft-mse': 'decoding samples in the official GroupDiff code',
}

# (pattern, replacement) on the dotted module path, applied in order.
_PATH_RULES = (
    (r'\.query$', '.to_q'),
    (r'\.key$', '.to_k'),
    (r'\.value$', '.to_v'),
    (r'\.proj_attn$', '.to_out.0'),
    (r'\b(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)\.(\d+)\b', r'\1_\2'),
)
# Inverse of the list rule, to name the diffusers key of a Flax leaf.
_INDEXED = re.compile(r'^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)$')

_LAYER_KIND = {
    'norm1': 'norm', 'norm2': 'norm', 'group_norm': 'norm', 'conv_norm_out': 'norm',
    'to_q': 'linear', 'to_k': 'linear', 'to_v': 'linear', 'to_out_0': 'linear',
}  # every other module is a conv


def _conv_shapes(hwio):
  kh, kw, cin, cout = hwio
  return [(cout, cin, kh, kw)]


def _linear_shapes(in_out):
  cin, cout = in_out
  return [(cout, cin), (cout, cin, 1, 1)]


def _same_shapes(shape):
  return [tuple(shape)]


def _conv_to_flax(w):
  return np.transpose(w, (2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]


def _linear_to_flax(w):
  return np.transpose(w.reshape(w.shape[:2]))  # [O, I] or [O, I, 1, 1] -> [I, O]


def _identity(w):
  return w


# (kind, torch leaf) -> (flax leaf, torch shapes accepted for a flax shape, torch array -> flax array)
_LEAF_RULES: dict[tuple[str, str], tuple[str, Callable, Callable]] = {
    ('conv', 'weight'): ('kernel', _conv_shapes, _conv_to_flax),
    ('conv', 'bias'): ('bias', _same_shapes, _identity),
    ('linear', 'weight'): ('kernel', _linear_shapes, _linear_to_flax),
    ('linear', 'bias'): ('bias', _same_shapes, _identity),
    ('norm', 'weight'): ('scale', _same_shapes, _identity),
    ('norm', 'bias'): ('bias', _same_shapes, _identity),
}


class VAEWeightsError(errors.WeightsError):
  """A state dict that does not match the configured AutoencoderKL."""


def flax_path(key: str) -> tuple[tuple[str, ...], tuple[str, Callable, Callable]]:
  """A diffusers key -> (Flax param path, leaf rule). KeyError for a key outside the layout."""
  module, _, leaf = key.rpartition('.')
  for pattern, replacement in _PATH_RULES:
    module = re.sub(pattern, replacement, module)
  names = tuple(module.split('.'))
  kind = _LAYER_KIND.get(names[-1], 'conv')
  if not module or (kind, leaf) not in _LEAF_RULES:
    raise KeyError(key)
  rule = _LEAF_RULES[(kind, leaf)]
  return names + (rule[0],), rule


def diffusers_key(path: tuple[str, ...]) -> str:
  """A Flax param path -> its key in the current diffusers spelling (`to_q`, `to_out.0`)."""
  parts = [_INDEXED.sub(r'\1.\2', name) for name in path[:-1]]
  leaf = {'kernel': 'weight', 'scale': 'weight'}.get(path[-1], path[-1])
  return '.'.join(parts + [leaf])


def expected_param_shapes(config: vae_lib.VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of `AutoencoderKL(config)` params, from `jax.eval_shape` (no memory used)."""
  side = config.downsample_factor
  images = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
  variables = jax.eval_shape(vae_lib.AutoencoderKL(config).init, jax.random.key(0), images)
  flat = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def weights_file(path: str | os.PathLike) -> str:
  """The weights file: `path` itself, or WEIGHTS_FILENAME inside a directory."""
  path = os.fspath(path)
  return os.path.join(path, WEIGHTS_FILENAME) if os.path.isdir(path) else path


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a diffusers safetensors file (or a directory holding WEIGHTS_FILENAME) with NumPy.

  Raises FileNotFoundError (saying where to get the file) or
  weights_io.WeightsFileError (unreadable file), both naming the path.
  """
  repos = '; '.join(f'{repo} ({use})' for repo, use in HF_REPOS.items())
  hint = (f'SD-VAE weights: download {WEIGHTS_FILENAME} from the HuggingFace repo {repos}, e.g. '
          f'`huggingface-cli download stabilityai/sd-vae-ft-mse {WEIGHTS_FILENAME} --local-dir DIR`, and pass '
          'that file or DIR.')
  return weights_io.read_arrays(weights_file(path), hint)


def load_vae_params(path_or_dict: str | os.PathLike | Mapping[str, Any],
                    config: vae_lib.VAEConfig = vae_lib.SD_VAE_CONFIG,
                    param_dtype=jnp.float32) -> dict:
  """diffusers AutoencoderKL weights -> the `params` tree of `vae.AutoencoderKL(config)`.

  Args:
    path_or_dict: a `.safetensors` file (fp32, fp16 or bf16), a directory
      holding `diffusion_pytorch_model.safetensors`, or a state dict of
      arrays in the PyTorch layout.
    config: the architecture the file must match (default: SD-VAE).
    param_dtype: dtype of the returned params.

  Returns:
    Nested dict of jax arrays; use as `vae.apply({'params': params}, ...)`.

  Raises:
    FileNotFoundError: no file at the path (the message says where to get it).
    weights_io.WeightsFileError: a file that cannot be read (truncated).
    VAEWeightsError: keys outside the layout, keys mapping to the same param,
      shapes that do not match, or params the file does not provide; the
      file and every offending key are named.
  """
  if isinstance(path_or_dict, Mapping):
    state, weights_path = dict(path_or_dict), ''
  else:
    state, weights_path = read_state_dict(path_or_dict), weights_file(path_or_dict)
  expected = expected_param_shapes(config)

  unknown, clashes, bad_shapes = [], [], []
  flat: dict[tuple[str, ...], np.ndarray] = {}
  source: dict[tuple[str, ...], str] = {}  # param path -> the key that named it
  for key in sorted(state):
    try:
      path, (_, torch_shapes, to_flax) = flax_path(key)
    except KeyError:
      unknown.append(key)
      continue
    if path not in expected:
      unknown.append(key)
      continue
    if path in source:
      clashes.append(f'{key} and {source[path]} both map to {"/".join(path)}')
      continue
    source[path] = key
    value = np.asarray(state[key])
    allowed = torch_shapes(expected[path])
    if value.shape not in allowed:
      bad_shapes.append(f'{key}: expected {" or ".join(map(str, allowed))}, found {value.shape}')
      continue
    flat[path] = to_flax(value.astype(np.float32))

  missing = [diffusers_key(path) for path in sorted(expected) if path not in source]
  if unknown or clashes or bad_shapes or missing:
    raise VAEWeightsError(weights_io.mismatch_message(
        f'State dict{weights_io.source_label(weights_path)} does not match AutoencoderKL({config}):',
        [('unknown keys', unknown), ('keys given twice (old and new attention names?)', clashes),
         ('wrong shapes (PyTorch layout)', bad_shapes), ('missing keys', missing)]))
  return weights_io.unflatten(flat, param_dtype)
