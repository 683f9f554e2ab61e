"""The one weight-import engine: read a file, rename and transpose by a per-model table, check every key and shape.

Used by convert.py (DiT/SiT/GroupDiff), encoders/vae_weights.py (SD-VAE) and
encoders/vit.py (DINOv2, CLIP). Each importer supplies only its table:
`locate(key) -> (our param path, Layout)` (`table_locator` builds one from
regex rows) and, where it has them, keys to ignore or refuse. The engine:

  * reads `.safetensors` / `.npz` with NumPy, and `.pt` / `.pth` / `.bin`
    with torch (optional; `weights_only` unless allow_pickle), through
    etils.epath (local or gs:// paths), refusing non-finite values;
  * maps every key to a distinct leaf of the model's `jax.eval_shape` tree
    (`param_shapes`), checks its shape in the source (PyTorch) layout,
    converts it (`LINEAR`: [out, in] -> [in, out]; `CONV`: OIHW -> HWIO;
    `SAME`; `custom` conversions are checked after converting), and that
    every leaf is filled;
  * reports every problem of a file together in one `WeightsImportError`
    naming the file and each key, expected and found shape.
"""

import dataclasses
import io
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from groupdiff_jax import errors

FORMATS = ('.safetensors', '.npz')  # read with NumPy only
TORCH_FORMATS = ('.pt', '.pth', '.bin')  # need torch


class WeightsImportError(errors.WeightsError):
  """Weights that cannot be imported: an unreadable file, non-finite values, or a state dict that does not match
  the model (the message names the file and every offending key)."""


# --- Reading files ----------------------------------------------------------------------
def read_arrays(path, hint: str = '', allow_pickle: bool = False, flatten=None) -> dict[str, np.ndarray]:
  """A weights file -> flat {key: array} (see `read_weights`, which also returns what a torch file skipped)."""
  return read_weights(path, hint, allow_pickle, flatten)[0]


def read_weights(path, hint: str = '', allow_pickle: bool = False, flatten=None):
  """`.safetensors`, `.npz` (NumPy only) or `.pt`/`.pth`/`.bin` (torch) -> (flat {key: array}, skipped entries).

  Args:
    path: the file (str or epath.Path; local or remote).
    hint: appended to the not-found message (where to get the file).
    allow_pickle: torch files only: load with weights_only=False (trusted files).
    flatten: torch files only: the loaded dict -> (flat {key: tensor}, skipped top-level entries); default: the
      dict is a plain state dict.

  Raises:
    MissingInputError naming the path (and the hint); WeightsImportError
    naming the path when the file is unreadable, of another format, or
    holds NaN/inf.
  """
  path = epath.Path(path)
  name = os.fspath(path)
  if not path.is_file():
    raise errors.MissingInputError(' '.join(filter(None, [f'No weights file at {name!r}.', hint])))
  if name.endswith(TORCH_FORMATS):
    obj = _read_torch(path, allow_pickle)
    if not isinstance(obj, Mapping):
      raise WeightsImportError(f'{name!r} holds a {type(obj).__name__}, not a state dict or checkpoint dict.')
    flat, skipped = flatten(obj) if flatten is not None else (dict(obj), [])
    arrays = {k: _to_numpy(v) for k, v in flat.items()}
  elif name.endswith(FORMATS):
    arrays, skipped = _read_numpy_formats(path, name), []
  else:
    raise WeightsImportError(f'{name!r}: unknown weights format; expected one of {FORMATS + TORCH_FORMATS}.')
  check_finite(arrays, name)
  return arrays, skipped


def _read_numpy_formats(path, name):
  try:
    if name.endswith('.safetensors'):
      import safetensors.numpy  # pylint: disable=import-outside-toplevel
      local = not re.match(r'^[a-z0-9]+://', name)
      return safetensors.numpy.load_file(name) if local else safetensors.numpy.load(path.read_bytes())
    with path.open('rb') as f, np.load(f, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except Exception as error:  # safetensors, zipfile and numpy raise several types for damaged files
    raise WeightsImportError(f'{name!r} cannot be read as {os.path.splitext(name)[1]} ({type(error).__name__}: '
                             f'{error}); the file may be truncated: download or convert it again.') from error


def _to_numpy(tensor):
  """A torch tensor or array -> numpy (bf16/fp16 tensors become float32: numpy has no bf16)."""
  if hasattr(tensor, 'detach'):
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
      tensor = tensor.float()
    return tensor.numpy()
  return np.asarray(tensor)


def _read_torch(path, allow_pickle):
  name = os.fspath(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        f'Reading {name!r} needs PyTorch, which is optional here: `pip install torch` (the CPU build is '
        'enough), or convert the file to .safetensors on a machine with torch (see `python -m '
        'groupdiff_jax.convert --help` / convert.py\'s docstring) and pass that instead.') from error
  data = path.read_bytes()
  if not allow_pickle:
    _check_torch_container(name, data)
  import argparse  # pylint: disable=import-outside-toplevel
  safe = [argparse.Namespace]  # the official DiT/REPA/GroupDiff files hold their argparse args
  try:
    with torch.serialization.safe_globals(safe):
      return torch.load(io.BytesIO(data), map_location='cpu', weights_only=not allow_pickle)
  except Exception as error:  # torch raises UnpicklingError subclasses that vary by version
    if allow_pickle:
      raise
    raise WeightsImportError(f'{name!r} holds pickled Python objects besides tensors and argparse args, which '
                             f'weights_only loading refuses ({error}). If you trust the file, pass '
                             '--allow_pickle.') from error


def _check_torch_container(name, data):
  """Raise WeightsImportError unless `data` is a whole torch.save file (a zip with a data.pkl).

  A truncated, overwritten or random file is told apart from one that needs
  pickle, so --allow_pickle is never suggested for a file that is merely broken.
  """
  broken = (f'{name!r} is truncated or not a PyTorch checkpoint (torch.save writes a zip archive holding '
            f'data.pkl); download it again.')
  if not zipfile.is_zipfile(io.BytesIO(data)):
    if data[:2] != b'\x80\x02':  # torch < 1.6 files are a bare pickle stream (protocol 2)
      raise WeightsImportError(broken)
    return
  try:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      names = archive.namelist()
      bad = archive.testzip()
  except (zipfile.BadZipFile, OSError, EOFError) as error:
    raise WeightsImportError(f'{broken} ({error})') from error
  if bad is not None or not any(n.endswith('/data.pkl') or n == 'data.pkl' for n in names):
    raise WeightsImportError(broken + (f' (damaged member {bad})' if bad else ' (no data.pkl inside)'))


def check_finite(arrays: Mapping[str, np.ndarray], path) -> None:
  """Raise WeightsImportError naming the file and the first key holding NaN or inf.

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
      raise WeightsImportError(f'{os.fspath(path)!r}: {key!r} holds {value.size - int(finite.sum())} non-finite '
                               f'value(s) (NaN or inf) of {value.size}; the weights are corrupt: download or '
                               f'convert them again.')


# --- The per-model table ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
  """How a source (PyTorch-layout) tensor becomes our leaf.

  source_shapes: our shape -> the source shapes accepted for it; None for a
    conversion that may change the shape (checked after converting).
  to_ours: source array -> our array.
  """
  source_shapes: Optional[Callable]
  to_ours: Callable


LINEAR = Layout(lambda s: [tuple(reversed(s))], np.transpose)  # [out, in] -> [in, out]
LINEAR_OR_1X1_CONV = Layout(lambda s: [tuple(reversed(s)), tuple(reversed(s)) + (1, 1)],
                            lambda w: np.transpose(w.reshape(w.shape[:2])))  # also [out, in, 1, 1]
CONV = Layout(lambda s: [(s[3], s[2], s[0], s[1])], lambda w: np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO
SAME = Layout(lambda s: [tuple(s)], lambda w: w)


def custom(to_ours):
  """A Layout whose conversion may change the shape (e.g. resize a position table): checked after converting."""
  return Layout(None, to_ours)


def table_locator(rows):
  """locate(key) -> (our path tuple, Layout) from rows (key regex, our path template with \\1 groups, Layout);
  the first row that matches wins; KeyError for a key no row matches."""
  compiled = [(re.compile(pattern), template, layout) for pattern, template, layout in rows]

  def locate(key):
    for regex, template, layout in compiled:
      match = regex.fullmatch(key)
      if match:
        return tuple(match.expand(template).split('/')), layout
    raise KeyError(key)
  return locate


def param_shapes(init, *args) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of the `params` of `init(PRNGKey(0), *args)` from jax.eval_shape (no memory used)."""
  variables = jax.eval_shape(init, jax.random.PRNGKey(0), *args)
  flat = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


# --- The engine ---------------------------------------------------------------------------------
def import_state_dict(state: Mapping, expected: Mapping, locate, *, header: str, ignore=(), unsupported=(),
                      unknown_note=lambda path: '', missing_name=lambda path: '/'.join(path),
                      optional=lambda path: False, problems=()):
  """A source state dict -> (flat {our path: float32 array}, {ignored key: why}); every problem in one error.

  Args:
    state: {source key: array} (PyTorch layout).
    expected: {our path: shape} of the model (`param_shapes`).
    locate: key -> (our path, Layout); KeyError for a key outside the table.
    header: the error's first line (names the file and the model).
    ignore: (regex, why) of keys consumed without becoming params.
    unsupported: (regex, why) of keys of layouts the model does not have.
    unknown_note: path -> what to add when a located path is not a param.
    missing_name: path -> how a missing param is named (its source key).
    optional: path -> True for a param the caller fills itself when the
      state lacks it (left out of the result and not an error).
    problems: the caller's own findings, reported with the rest.

  Raises:
    WeightsImportError: unsupported, unknown or doubly given keys, wrong
      shapes, missing params or the caller's problems, all listed.
  """
  flat, source, ignored = {}, {}, {}
  unknown, unsupported_found, clashes, bad_shapes = [], [], [], []
  for key in sorted(state):
    reason = next((why for pattern, why in ignore if re.fullmatch(pattern, key)), None)
    if reason is not None:
      ignored[key] = reason
      continue
    reason = next((why for pattern, why in unsupported if re.fullmatch(pattern, key)), None)
    if reason is not None:
      unsupported_found.append(f'{key}: {reason}')
      continue
    try:
      path, layout = locate(key)
    except KeyError:
      unknown.append(key)
      continue
    if path not in expected:
      unknown.append(f'{key} -> {"/".join(path)}, not a param of this model{unknown_note(path)}')
      continue
    if path in source:
      clashes.append(f'{key} and {source[path]} both map to {"/".join(path)}')
      continue
    source[path] = key
    value = np.asarray(state[key], np.float32)
    if layout.source_shapes is not None:
      allowed = layout.source_shapes(expected[path])
      if value.shape not in allowed:
        bad_shapes.append(f'{key}: expected {" or ".join(map(str, allowed))}, found {value.shape}')
        continue
    converted = layout.to_ours(value)
    if tuple(converted.shape) != tuple(expected[path]):
      bad_shapes.append(f'{key}: converts to {converted.shape}, {"/".join(path)} needs {expected[path]} '
                        f'(found {value.shape})')
      continue
    flat[path] = converted
  missing = [missing_name(path) for path in sorted(expected) if path not in source and not optional(path)]
  if unsupported_found or unknown or clashes or bad_shapes or missing or problems:
    raise WeightsImportError(mismatch_message(header, [
        ('unsupported layout', unsupported_found), ('unknown keys', unknown),
        ('keys given twice (old and new names?)', clashes), ('wrong shapes (PyTorch layout)', bad_shapes),
        ('missing keys', missing), ('other problems', list(problems))]))
  return flat, ignored


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
