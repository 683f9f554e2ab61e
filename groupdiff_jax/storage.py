"""The one path layer: every file this program reads or writes goes through `etils.epath`.

A local path behaves as before; `gs://bucket/...` (and `s3://`) reaches
the bucket through epath (TensorFlow's GCS filesystem where TensorFlow is
installed), the same layer orbax uses for its metadata (its arrays go
through tensorstore, which reads the same credentials).

Storage faults. A transient error (a timeout, a reset or refused
connection, HTTP 429 or 5xx, gRPC/absl UNAVAILABLE or DEADLINE_EXCEEDED)
is retried `RETRIES` times with exponential backoff, each wait logged with
the path; if storage stays unreachable, `StorageUnavailable` is raised,
which `errors.run_main` turns into exit 75 (EXIT_PREEMPTED: "retry"), so
the launchers requeue the run. Nothing else is retried here: a missing
file, a permission error or corrupt data is the caller's to report.
"""

import io
import os
import re
import time

from absl import logging
from etils import epath

from groupdiff_jax import errors

RETRIES = 4
FIRST_WAIT_S = 2.0
MAX_WAIT_S = 30.0
# Tests replace it (no wall-clock dependence): called with the seconds to wait.
sleep = time.sleep

_SCHEMES = ('gs://', 's3://')


def path(value):
  """`value` as an epath.Path: a local path made absolute (as before), a bucket path as given."""
  text = os.fspath(value)
  if is_remote(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))


def is_remote(value):
  return os.fspath(value).startswith(_SCHEMES)


def require_local(value, what, how):
  """Raise one ConfigError for a bucket path where only a local one can work (`how`: how to get it local)."""
  if is_remote(value):
    raise errors.ConfigError(f'{what}={os.fspath(value)} is a bucket path, but it must be on a local disk of '
                             f'every host: {how}')


# Messages of the transient failures of TensorFlow's GCS filesystem, tensorstore, fsspec and the OS.
_TRANSIENT = re.compile(
    r'\b(UNAVAILABLE|DEADLINE_EXCEEDED|Unavailable|DeadlineExceeded|timed? ?out|Timeout|Connection (reset|refused|'
    r'aborted)|connection (reset|refused|aborted)|Couldn\'t connect|Could not connect|Failed to connect|'
    r'All \d+ retry attempts failed|HTTP response code (429|5\d\d)|HTTP status (429|5\d\d)|'
    r'code[ =:]+(429|50[0234])\b|Service Unavailable|Too Many Requests|Broken pipe|Remote end closed)')


def is_transient(error):
  """True if `error`, or an exception in its cause/context chain, is a storage fault that may pass."""
  seen, todo = set(), [error]
  while todo:
    current = todo.pop()
    if current is None or id(current) in seen:
      continue
    seen.add(id(current))
    if isinstance(current, (TimeoutError, ConnectionError)):
      return True
    if isinstance(current, Exception) and _TRANSIENT.search(str(current)):
      return True
    todo += [current.__cause__, current.__context__, *getattr(current, 'exceptions', ())]
  return False


def unavailable(where, error, retried=True):
  """The StorageUnavailable for `error` at `where` (`retried`: after this module's retries, else after the
  storage client's own, e.g. a background checkpoint write)."""
  after = f' after {RETRIES} retries' if retried else ''
  return errors.StorageUnavailable(
      f'Storage at {where} is unreachable ({first_line(error)}){after}; nothing was moved or lost: rerun the '
      f'same command (exit {errors.EXIT_PREEMPTED}: the launchers requeue it) when it is back.')


def first_line(error):
  text = f'{type(error).__name__}: {error}'.splitlines()
  return text[0][:300] if text else type(error).__name__


def retry(function, where):
  """`function()`, retried with backoff while it fails transiently (logged with `where`); raises
  StorageUnavailable after RETRIES retries, and any other error at once."""
  wait = FIRST_WAIT_S
  for attempt in range(RETRIES + 1):
    try:
      return function()
    except Exception as error:  # classified right below; anything else is re-raised as it is
      if not is_transient(error):
        raise
      if attempt == RETRIES:
        raise unavailable(where, error) from error
      logging.warning('Storage error at %s (%s); retrying in %.0f s (%d/%d).', where, first_line(error), wait,
                      attempt + 1, RETRIES)
      sleep(wait)
      wait = min(2 * wait, MAX_WAIT_S)


def write_bytes(target, data):
  target = epath.Path(target)
  retry(lambda: target.parent.mkdir(parents=True, exist_ok=True), target.parent)
  retry(lambda: target.write_bytes(data), target)


def write_text(target, text):
  write_bytes(target, text.encode())


def read_bytes(source):
  source = epath.Path(source)
  return retry(source.read_bytes, source)


def read_text(source):
  return read_bytes(source).decode()


def save_npz(target, **arrays):
  """np.savez to any path (written in memory, then as one object: no partial file under its name)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(target, buffer.getvalue())


def load_npz(source):
  """{name: array} of an .npz at any path."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(io.BytesIO(read_bytes(source))) as data:
    return {name: data[name] for name in data.files}


def save_png(target, image):
  """A uint8 (H, W) or (H, W, C) image as a PNG at any path."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  write_bytes(target, buffer.getvalue())


class _Stream:
  """A bucket object's writer as a plain, non-seekable stream (zipfile then writes data descriptors instead of
  seeking back, as it does on a pipe)."""

  def __init__(self, file):
    self._file, self._position = file, 0

  def write(self, data):
    self._file.write(data)
    self._position += len(data)
    return len(data)

  def tell(self):
    return self._position

  def read(self, *unused):  # numpy takes an object without `read` for a file name
    raise io.UnsupportedOperation('write-only')

  def seekable(self):
    return False

  def flush(self):
    self._file.flush()


def write_atomically(target, write):
  """write(binary file object) into `target`, which appears whole or not at all: locally through
  `<target>.tmp`, fsync and a rename, in a bucket as one object upload (retried whole while storage fails
  transiently; `write` must be repeatable)."""
  target = epath.Path(target)
  if is_remote(target):
    def upload():
      target.parent.mkdir(parents=True, exist_ok=True)
      with target.open('wb') as f:
        write(_Stream(f))
    retry(upload, target)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / (target.name + '.tmp')
  with tmp.open('wb') as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(target)


def move_tree(source, destination):
  """Move a folder: a rename locally, a copy object by object then a delete in a bucket (no folder rename)."""
  source, destination = epath.Path(source), epath.Path(destination)
  if not is_remote(source):
    retry(lambda: source.rename(destination), source)
    return
  for root, _, files in retry(lambda: list(source.walk()), source):
    relative = root.relative_to(source)
    for name in files:
      retry(lambda: (root / name).copy(destination / relative / name, overwrite=True), root / name)
  retry(source.rmtree, source)
