"""The latent store and neighbour lists of docs/method.md, Data formats: write, read, validate.

Latent store (one directory):
  latents.npy  float16 or bfloat16, [M, 32, 32, 4], or [M, 2, 32, 32, 4]
               where [:, 1] is the latent of the horizontally flipped image
  labels.npy   int32 [M]
  meta.json    source, vae, scale, resolution, count, checksum (+ free fields)

Neighbour lists (one directory):
  neighbors.npy  int32 [M, K], row i = nearest neighbours of i, best first,
                 self excluded
  scores.npy     float16 [M, K] cosine similarities
  meta.json      tau, K, index parameters, measured recall

Arrays are memory-mapped for reading, so the readers need a local copy (a
gs:// directory is refused with how to copy it to each host); the writers
write to any path (storage.py: a local folder or a bucket). NumPy writes bfloat16 (ml_dtypes) as
the opaque type '<V2'; reading views it back as bfloat16. Every check fails
with a message that names the file, the value found and what to do.
"""

import hashlib
import json

import ml_dtypes
import numpy as np
from etils import epath

from groupdiff_jax import errors, storage

LATENTS, LABELS, META = 'latents.npy', 'labels.npy', 'meta.json'
NEIGHBORS, SCORES = 'neighbors.npy', 'scores.npy'
LATENT_DTYPES = ('float16', 'bfloat16')
LATENT_SHAPE = (32, 32, 4)  # 256 px / 8, SD-VAE channels


class StoreError(errors.DataError):
  """A store file that does not follow docs/method.md, Data formats."""


def _dtype_name(array):
  if array.dtype == np.dtype('V2') or array.dtype == ml_dtypes.bfloat16:
    return 'bfloat16'
  return array.dtype.name


def _as_bfloat16(array):
  return array.view(ml_dtypes.bfloat16) if array.dtype == np.dtype('V2') else array


COPY_HOW = ('copy it to the same local path on every host first (e.g. `gcloud storage cp -r gs://BUCKET/DIR /data/`; '
            'launch/tpu_pod.sh does it with LATENTS_URI=... LOCAL_LATENTS=...) and pass that path.')


def _load(path, what):
  storage.require_local(path, 'the memory-mapped store file', COPY_HOW)
  if not epath.Path(path).exists():
    raise StoreError(f'{path}: missing ({what}). Write it with the job named in the module docstring of '
                     f'groupdiff_jax/data/latent_store.py.')
  try:
    return np.load(path, mmap_mode='r')
  except ValueError as e:
    raise StoreError(f'{path}: not a readable .npy file ({e}); rewrite it.') from e


def read_meta(directory):
  path = epath.Path(directory) / META
  if not path.exists():
    raise StoreError(f'{path}: missing meta.json; rewrite the store with its job.')
  return errors.read_json_object(path, StoreError, 'rewrite the store with its job.')


def write_meta(directory, meta):
  storage.write_atomically(epath.Path(directory) / META,
                           lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True).encode()))


# ---------------------------------------------------------------- latent store


def checksum(paths, chunk_bytes=1 << 24):
  """sha256 over the raw bytes of `paths`, in order (streamed)."""
  digest = hashlib.sha256()
  for path in paths:
    with epath.Path(path).open('rb') as f:
      while chunk := f.read(chunk_bytes):
        digest.update(chunk)
  return 'sha256:' + digest.hexdigest()


def store_checksum(directory):
  return checksum([epath.Path(directory) / LATENTS, epath.Path(directory) / LABELS])


def write_latent_store(directory, latents, labels, meta=None):
  """Write a whole (small) store: latents [M, 32, 32, 4] or [M, 2, ...], labels [M].

  `latents` must already be float16 or bfloat16 (the caller picks the
  precision). meta gets count and checksum filled in. Returns the path.
  """
  latents = np.asarray(latents)
  labels = np.asarray(labels)
  if _dtype_name(latents) not in LATENT_DTYPES:
    raise StoreError(f'latents dtype {latents.dtype} is not one of {LATENT_DTYPES}; cast before writing.')
  _save(epath.Path(directory) / LATENTS, latents)
  _save(epath.Path(directory) / LABELS, labels.astype(np.int32))
  meta = dict(meta or {})
  meta.update(count=int(len(latents)), checksum=store_checksum(directory), dtype=_dtype_name(latents),
              flipped=bool(latents.ndim == 5))
  write_meta(directory, meta)
  return directory


def _save(path, array):
  """np.save to any path (atomically: nothing under the name until it is whole)."""
  storage.write_atomically(path, lambda f: np.save(f, array))


class LatentStore:
  """A read-only, memory-mapped latent store.

  Attributes:
    latents: memmap [M, 32, 32, 4] or [M, 2, 32, 32, 4] (float16/bfloat16).
    labels: int32 [M] (in memory).
    meta: the meta.json dict.
    has_flips: whether latents hold a flipped copy.
  """

  def __init__(self, directory, verify_checksum=False, num_classes=None):
    self.directory = directory
    storage.require_local(directory, 'config.data.latent_dir (the latent store, memory-mapped)', COPY_HOW)
    if not epath.Path(directory).is_dir():
      raise StoreError(f'{directory}: no latent store here (config.data.latent_dir). Run the latent extraction '
                       f'job: python -m groupdiff_jax.data.extract_latents_job --output_dir={directory} ...')
    self.meta = read_meta(directory)
    latents_path, labels_path = str(epath.Path(directory) / LATENTS), str(epath.Path(directory) / LABELS)
    self.latents = _as_bfloat16(_load(latents_path, 'latents float16/bfloat16 [M, 32, 32, 4]'))
    self.labels = np.asarray(_load(labels_path, 'labels int32 [M]'))
    validate_latents(self.latents, self.labels, self.meta, latents_path, labels_path, num_classes)
    self.has_flips = self.latents.ndim == 5
    if verify_checksum and self.meta.get('checksum'):
      found = store_checksum(directory)
      if found != self.meta['checksum']:
        raise StoreError(f'{directory}: checksum {found} does not match meta.json {self.meta["checksum"]}; '
                         f'the files changed after writing: re-run the extraction job.')

  def __len__(self):
    return len(self.labels)


def validate_latents(latents, labels, meta, latents_path='latents.npy', labels_path='labels.npy', num_classes=None):
  """Raise StoreError unless latents/labels/meta follow the format.

  num_classes: the model's classes; a label >= num_classes is refused
  (num_classes itself is the null class: it would train as unconditional).
  One pass over the in-memory int32 labels (about 1 ms at 1.28M rows).
  """
  name = _dtype_name(latents)
  if name not in LATENT_DTYPES:
    raise StoreError(f'{latents_path}: dtype {latents.dtype} is not float16 or bfloat16; rewrite the store.')
  if latents.shape[1:] not in (LATENT_SHAPE, (2,) + LATENT_SHAPE):
    raise StoreError(f'{latents_path}: shape {latents.shape}; expected [M, 32, 32, 4] or [M, 2, 32, 32, 4] '
                     f'(256 px images through SD-VAE).')
  if labels.dtype != np.int32 or labels.ndim != 1:
    raise StoreError(f'{labels_path}: dtype {labels.dtype} shape {labels.shape}; expected int32 [M].')
  if len(labels) != len(latents):
    raise StoreError(f'{labels_path}: {len(labels)} labels for {len(latents)} latent rows in {latents_path}; '
                     f'the store is incomplete: finish or re-run the extraction job.')
  if len(labels) and labels.min() < 0:
    raise StoreError(f'{labels_path}: negative label {labels.min()}.')
  if num_classes is not None and len(labels):
    too_big = int(np.count_nonzero(labels >= num_classes))
    if too_big:
      raise StoreError(f'{labels_path}: {too_big} labels >= model.num_classes={num_classes} (largest '
                       f'{int(labels.max())}; {num_classes} is the null class of classifier-free guidance); '
                       f'labels must be in [0, {num_classes}): fix the store or model.num_classes.')
  count = meta.get('count')
  if count is not None and count != len(labels):
    raise StoreError(f'meta.json count={count} but {latents_path} has {len(latents)} rows.')


# ---------------------------------------------------------------- neighbour lists


def write_neighbors(directory, neighbors, scores, meta=None):
  """neighbors int [M, K] and scores [M, K] (stored float16) plus meta.json."""
  _save(epath.Path(directory) / NEIGHBORS, np.asarray(neighbors, np.int32))
  _save(epath.Path(directory) / SCORES, np.asarray(scores, np.float16))
  meta = dict(meta or {})
  meta.update(count=int(len(neighbors)), K=int(np.shape(neighbors)[1]))
  write_meta(directory, meta)
  return directory


def read_neighbors(directory, num_rows=None, min_neighbors=1):
  """Memory-mapped (neighbors int32 [M, K], scores float16 [M, K], meta), validated.

  Args:
    num_rows: M of the latent store the lists must match (None: not checked).
    min_neighbors: the least K that works (N-1 for groups of N).
  """
  storage.require_local(directory, 'config.data.neighbors_dir (neighbour lists, memory-mapped)', COPY_HOW)
  if not epath.Path(directory).is_dir():
    raise StoreError(f'{directory}: no neighbour lists here (config.data.neighbors_dir). Run '
                     f'python -m groupdiff_jax.data.neighbors_job --embeddings_dir=... --output_dir={directory}.')
  path, scores_path = str(epath.Path(directory) / NEIGHBORS), str(epath.Path(directory) / SCORES)
  neighbors = _load(path, 'int32 [M, K]')
  scores = _load(scores_path, 'float16 [M, K]')
  meta = read_meta(directory)
  if neighbors.dtype != np.int32 or neighbors.ndim != 2:
    raise StoreError(f'{path}: dtype {neighbors.dtype} shape {neighbors.shape}; expected int32 [M, K].')
  if scores.shape != neighbors.shape or scores.dtype not in (np.float16, np.float32):
    raise StoreError(f'{scores_path}: dtype {scores.dtype} shape {scores.shape}; expected float16 '
                     f'{neighbors.shape} like {path}.')
  if num_rows is not None and len(neighbors) != num_rows:
    raise StoreError(f'{path}: {len(neighbors)} rows but the latent store has {num_rows}; the lists were built '
                     f'for other data: re-run the neighbour job on this store\'s embeddings.')
  if neighbors.shape[1] < min_neighbors:
    raise StoreError(f'{path}: K={neighbors.shape[1]} neighbours per row; groups need at least {min_neighbors}.')
  if neighbors.size and (neighbors.min() < 0 or neighbors.max() >= len(neighbors)):
    raise StoreError(f'{path}: ids in [{neighbors.min()}, {neighbors.max()}] outside [0, {len(neighbors)}).')
  check_neighbor_rows(neighbors, path)
  return neighbors, scores, meta


def check_neighbor_rows(neighbors, path='neighbors.npy', chunk_rows=1 << 16):
  """Raise StoreError naming the first row that lists itself or an id twice.

  Vectorised over chunks of `chunk_rows` rows of the (memory-mapped) int32
  [M, K] array: a compare with the row ids and a sort along K per chunk,
  O(M K log K) with ~50 MB of working memory per chunk; measured 0.13 s for
  M=128K, K=100 on a shared 2-core CPU, so about 1.3 s (more for unsorted
  rows) at M=1.28M, once per run against minutes of startup.
  """
  for start in range(0, len(neighbors), chunk_rows):
    rows = np.asarray(neighbors[start:start + chunk_rows])
    ids = np.arange(start, start + len(rows))[:, None]
    selfs = np.flatnonzero((rows == ids).any(axis=1))
    if len(selfs):
      row = start + int(selfs[0])
      raise StoreError(f'{path}: row {row} lists itself as a neighbour ({len(selfs)} such rows from row {start}); '
                       f'the format excludes self: re-run the neighbour job.')
    ordered = np.sort(rows, axis=1)
    dupes = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
    if len(dupes):
      row = start + int(dupes[0])
      repeated = ordered[dupes[0], 1:][ordered[dupes[0], 1:] == ordered[dupes[0], :-1]]
      raise StoreError(f'{path}: row {row} lists neighbour id(s) {sorted(set(repeated.tolist()))[:5]} more than '
                       f'once (groups would hold the same image twice): re-run the neighbour job.')
