"""Weight files read with NumPy only, and the pieces every importer shares.

Used by convert.py (DiT/SiT/GroupDiff), encoders/vae_weights.py (SD-VAE)
and encoders/vit.py (DINOv2, CLIP): one place that reads `.safetensors` /
`.npz`, names the file in every error, and builds the nested params dict.
"""

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from groupdiff_jax import errors

FORMATS = ('.safetensors', '.npz')


class WeightsFileError(errors.WeightsError):
  """A weights file that exists but cannot be read (truncated download, another format)."""


def read_arrays(path: str | os.PathLike, hint: str = '') -> dict[str, np.ndarray]:
  """`.safetensors` or `.npz` -> flat {key: array}, with NumPy only.

  Args:
    path: the file.
    hint: appended to the not-found message (where to get the file).

  Raises:
    FileNotFoundError naming the path (and the hint); WeightsFileError
    naming the path when the file is unreadable or of another format.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.MissingInputError(' '.join(filter(None, [f'No weights file at {path!r}.', hint])))
  if not path.endswith(FORMATS):
    raise WeightsFileError(f'{path!r}: unknown weights format; expected one of {FORMATS}.')
  try:
    if path.endswith('.safetensors'):
      import safetensors.numpy  # pylint: disable=import-outside-toplevel
      arrays = safetensors.numpy.load_file(path)
    else:
      with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
  except Exception as error:  # safetensors, zipfile and numpy raise several types for damaged files
    raise WeightsFileError(f'{path!r} cannot be read as {os.path.splitext(path)[1]} ({type(error).__name__}: '
                           f'{error}); the file may be truncated: download or convert it again.') from error
  check_finite(arrays, path)
  return arrays


def check_finite(arrays: Mapping[str, np.ndarray], path) -> None:
  """Raise WeightsFileError naming the file and the first key holding NaN or inf.

  One vectorised pass over the floating-point arrays (np.isfinite(...).all()
  per key): about a second for SiT-XL/2's 675M float32 parameters on one
  core, against the seconds the file takes to read.
  """
  for key, value in arrays.items():
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != 'bfloat16':
      continue
    finite = np.isfinite(value.astype(np.float32) if value.dtype.name == 'bfloat16' else value)
    if not finite.all():
      raise WeightsFileError(f'{os.fspath(path)!r}: {key!r} holds {value.size - int(finite.sum())} non-finite '
                             f'value(s) (NaN or inf) of {value.size}; the weights are corrupt: download or '
                             f'convert them again.')


def problem_lines(title: str, lines: list[str], limit: int = 20) -> list[str]:
  """A titled, indented list of problems, at most `limit` shown: ['title (n):', '  line', ...]."""
  shown = [f'  {line}' for line in lines[:limit]]
  if len(lines) > limit:
    shown.append(f'  ... and {len(lines) - limit} more')
  return [f'{title} ({len(lines)}):'] + shown


def mismatch_message(header: str, sections) -> str:
  """`header` and, for each (title, problems) of `sections` with problems, its `problem_lines`."""
  lines = [header]
  for title, problems in sections:
    if problems:
      lines += problem_lines(title, problems)
  return '\n'.join(lines)


def unflatten(flat: Mapping[tuple[str, ...], np.ndarray], dtype=None) -> dict:
  """{param path tuple: array} -> nested dict of jax arrays (a Flax `params` tree)."""
  params: dict = {}
  for path, value in flat.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(value, dtype=dtype)
  return params


def source_label(path) -> str:
  """' of <file>' for error messages when the weights came from a file, '' for an in-memory dict."""
  return f' of {os.fspath(path)!r}' if path else ''
