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
  * `_LEAF_RULES` map (kind, `weight`|`bias`) to the Flax leaf and its
    weights_io layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]
    (also accepted as a 1x1 conv [out, in, 1, 1]), norm weight -> scale.
Every key of the file must land on a distinct leaf of `jax.eval_shape` of the
module's init with the expected shape, and every leaf must be filled; all
problems are reported together in one weights_io.WeightsImportError, naming
the keys (weights_io.import_state_dict, the engine every importer shares).
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from groupdiff_jax import weights_io
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


# (kind, diffusers leaf) -> (Flax leaf, layout); a linear is also accepted as a 1x1 conv [out, in, 1, 1].
_LEAF_RULES = {
    ('conv', 'weight'): ('kernel', weights_io.CONV),
    ('conv', 'bias'): ('bias', weights_io.SAME),
    ('linear', 'weight'): ('kernel', weights_io.LINEAR_OR_1X1_CONV),
    ('linear', 'bias'): ('bias', weights_io.SAME),
    ('norm', 'weight'): ('scale', weights_io.SAME),
    ('norm', 'bias'): ('bias', weights_io.SAME),
}


def flax_path(key: str) -> tuple[tuple[str, ...], weights_io.Layout]:
  """A diffusers key -> (Flax param path, layout). KeyError for a key outside the layout."""
  module, _, leaf = key.rpartition('.')
  for pattern, replacement in _PATH_RULES:
    module = re.sub(pattern, replacement, module)
  names = tuple(module.split('.'))
  kind = _LAYER_KIND.get(names[-1], 'conv')
  if not module or (kind, leaf) not in _LEAF_RULES:
    raise KeyError(key)
  flax_leaf, layout = _LEAF_RULES[(kind, leaf)]
  return names + (flax_leaf,), layout


def diffusers_key(path: tuple[str, ...]) -> str:
  """A Flax param path -> its key in the current diffusers spelling (`to_q`, `to_out.0`)."""
  parts = [_INDEXED.sub(r'\1.\2', name) for name in path[:-1]]
  leaf = {'kernel': 'weight', 'scale': 'weight'}.get(path[-1], path[-1])
  return '.'.join(parts + [leaf])


def expected_param_shapes(config: vae_lib.VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of `AutoencoderKL(config)` params, from `jax.eval_shape` (no memory used)."""
  side = config.downsample_factor
  images = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
  return weights_io.param_shapes(vae_lib.AutoencoderKL(config).init, images)


def weights_file(path: str | os.PathLike) -> str:
  """The weights file: `path` itself, or WEIGHTS_FILENAME inside a directory."""
  path = epath.Path(path)
  return os.fspath(path / WEIGHTS_FILENAME if path.is_dir() else path)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a diffusers safetensors file (or a directory holding WEIGHTS_FILENAME) with NumPy.

  Raises FileNotFoundError (saying where to get the file) or
  weights_io.WeightsImportError (unreadable file), both naming the path.
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
    weights_io.WeightsImportError: a file that cannot be read (truncated),
      keys outside the layout, keys mapping to the same param, shapes that
      do not match, or params the file does not provide; the file and every
      offending key are named.
  """
  if isinstance(path_or_dict, Mapping):
    state, weights_path = dict(path_or_dict), ''
  else:
    state, weights_path = read_state_dict(path_or_dict), weights_file(path_or_dict)
  expected = expected_param_shapes(config)
  flat, _ = weights_io.import_state_dict(
      state, expected, flax_path, missing_name=diffusers_key,
      header=f'State dict{weights_io.source_label(weights_path)} does not match AutoencoderKL({config}):')
  return weights_io.unflatten(flat, param_dtype)
