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


class WeightsFileError(ValueError):
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
      return safetensors.numpy.load_file(path)
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except Exception as error:  # safetensors, zipfile and numpy raise several types for damaged files
    raise WeightsFileError(f'{path!r} cannot be read as {os.path.splitext(path)[1]} ({type(error).__name__}: '
                           f'{error}); the file may be truncated: download or convert it again.') from error


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
