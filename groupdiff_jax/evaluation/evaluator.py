"""ADM-protocol evaluator: FID, sFID, Inception Score, precision, recall.

    python -m groupdiff_jax.evaluation.evaluator REF_BATCH.npz SAMPLE_BATCH.npz \
        --inception_graph=classify_image_graph_def.pb

As openai/guided-diffusion `evaluations/evaluator.py`, so numbers compare
with the papers' (DiT, SiT, GroupDiff report FID-50K this way):
- REF_BATCH is an ADM reference batch (ImageNet 256:
  `VIRTUAL_imagenet256_labeled.npz`): `arr_0` uint8 [M, 256, 256, 3] and
  precomputed `mu`, `sigma` (pool, 2048) and `mu_s`, `sigma_s` (spatial,
  2023). Stored statistics are used when present (as ADM); `arr_0` is needed
  for precision/recall (skipped, with a note, when absent).
- SAMPLE_BATCH holds `arr_0` uint8 [N, 256, 256, 3] (N = 50000 for FID-50K;
  other keys such as labels are ignored). Sample statistics are always
  computed from the images.
- IS from the sample softmax (splits of 5000), FID on pool_3, sFID on the
  spatial features, precision/recall with k = 3 on pool_3 (inception.py,
  fid.py, precision_recall.py hold the details).

Arrays are streamed from the npz in batches, so 50K images never sit in
memory. Results are printed and written as JSON beside the samples
(`SAMPLE_BATCH.eval.json` unless --output_json says otherwise).
"""

import argparse
import json
import logging as python_logging
import sys
import zipfile

import numpy as np
from absl import logging
from etils import epath

from groupdiff_jax import errors, storage
from groupdiff_jax.evaluation import fid as fid_lib
from groupdiff_jax.evaluation import inception as inception_lib
from groupdiff_jax.evaluation import precision_recall as pr_lib
from groupdiff_jax.progress import Progress

IMAGES_KEY = 'arr_0'
PROTOCOL_IMAGE_SIZE = 256
PROTOCOL_NUM_SAMPLES = 50000

_SAVE_HINT = ('Save images as np.savez(path, arr_0=images) with images uint8 [N, H, W, 3] in '
              '[0, 255], e.g. np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for x in [0, 1].')


# ----------------------------------------------------------------- npz input


class NpzImages:
  """Header of an image array inside an npz, and batches read from it."""

  def __init__(self, path, key, shape, dtype, reader):
    self.path, self.key, self.shape, self.dtype = path, key, tuple(shape), np.dtype(dtype)
    self._reader = reader

  def __len__(self):
    return self.shape[0]

  def batches(self, batch_size):
    """Yields [<= batch_size, H, W, 3] arrays in order (each call reads the file anew)."""
    return self._reader(batch_size)


def npz_keys(path):
  """Names of the arrays in an npz; clear errors for a missing or non-npz file."""
  if not epath.Path(path).is_file():
    raise errors.MissingInputError(f'No such file: {path}; check the path of the .npz.')
  try:
    with epath.Path(path).open('rb') as raw, zipfile.ZipFile(raw) as zf:
      return [n[:-4] for n in zf.namelist() if n.endswith('.npy')]
  except zipfile.BadZipFile as e:
    raise errors.DataError(f'{path}: not an .npz file (np.savez output). {_SAVE_HINT}') from e


def _stream_batches(path, member, shape, dtype, offset):
  def read(batch_size):
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    with epath.Path(path).open('rb') as raw, zipfile.ZipFile(raw) as zf, zf.open(member) as f:
      f.read(offset)  # skip the .npy header
      for start in range(0, shape[0], batch_size):
        count = min(batch_size, shape[0] - start)
        data = f.read(count * row_bytes)
        if len(data) != count * row_bytes:
          raise errors.DataError(f'{path}: {member} ends early (truncated file?) at image {start}; write the '
                                 'file again.')
        yield np.frombuffer(data, dtype).reshape(count, *shape[1:])
  return read


def _npy_header(path, member):
  """(shape, fortran_order, dtype) and data offset of a .npy in a zip, or None."""
  with epath.Path(path).open('rb') as raw, zipfile.ZipFile(raw) as zf, zf.open(member) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      header = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      header = np.lib.format.read_array_header_2_0(f)
    else:
      return None, None
    return header, f.tell()


def open_images(path, key=IMAGES_KEY):
  """Validated view of `key` in an npz: uint8 [N, H, W, 3], N >= 2."""
  keys = npz_keys(path)
  if key not in keys:
    raise errors.DataError(f'{path}: no array {key!r} (it has {keys}). {_SAVE_HINT}')
  member = key + '.npy'
  header, offset = _npy_header(path, member)
  if header is None or header[1] or header[2].hasobject:
    # Unusual .npy (version 3, Fortran order, objects): read it whole.
    array = storage.load_npz(path)[key]
    shape, dtype = array.shape, array.dtype
    reader = lambda bs: (array[i:i + bs] for i in range(0, len(array), bs))
  else:
    shape, _, dtype = header
    reader = _stream_batches(path, member, shape, dtype, offset)
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
    raise errors.DataError(f'{path}: {key} must be uint8 images [N, H, W, 3] (ADM protocol: '
                           f'[N, {PROTOCOL_IMAGE_SIZE}, {PROTOCOL_IMAGE_SIZE}, 3]); got {dtype} {tuple(shape)}. '
                           f'{_SAVE_HINT}')
  if shape[0] < 2:
    raise errors.DataError(f'{path}: {key} has {shape[0]} image(s); statistics need at least 2.')
  return NpzImages(path, key, shape, dtype, reader)


# ---------------------------------------------------------------- evaluation


def _features(net, images, label):
  logging.info('Inception features of %s: %d images %s from %s', label, len(images), images.shape[1:3], images.path)
  progress = Progress(f'Inception features of {label}', len(images), 'images')
  try:
    return net.features(images.batches(net.batch_size), total=len(images), progress=progress)
  finally:
    progress.close()


def evaluate(ref_path, sample_path, inception_graph, *, batch_size=inception_lib.FEATURE_BATCH_SIZE,
             is_split_size=inception_lib.IS_SPLIT_SIZE, pr_precision='adm_float16',
             spec=inception_lib.GraphSpec()):
  """Runs the ADM protocol; returns a JSON-ready dict of metrics and settings.

  Args:
    ref_path: ADM reference batch npz (arr_0 and/or mu, sigma, mu_s, sigma_s).
    sample_path: sample npz with arr_0 uint8 [N, H, W, 3].
    inception_graph: path of classify_image_graph_def.pb.
    batch_size: images per Inception batch (ADM: 64).
    is_split_size: samples per Inception Score split (ADM: 5000).
    pr_precision: distance precision of precision/recall (precision_recall.py).
    spec: tensor names in the graph (stand-in graphs in tests).
  """
  # Cheap checks first: a wrong file should fail before TensorFlow loads.
  inception_lib.check_graph_path(inception_graph)
  samples = open_images(sample_path)
  ref_stats = fid_lib.maybe_load(ref_path)
  ref_images = open_images(ref_path) if IMAGES_KEY in npz_keys(ref_path) else None
  if ref_stats is None and ref_images is None:
    raise errors.DataError(f'{ref_path}: a reference batch needs {IMAGES_KEY!r} images or precomputed '
                           f'statistics {fid_lib.POOL_KEYS + fid_lib.SPATIAL_KEYS}; it has neither '
                           f'(keys: {npz_keys(ref_path)}). Use ADM\'s reference batch '
                           '(VIRTUAL_imagenet256_labeled.npz).')
  if ref_images is not None:
    for name, images in (('reference', ref_images), ('sample', samples)):
      if len(images) <= pr_lib.NEIGHBORHOOD_SIZE:
        raise errors.DataError(f'{images.path}: {len(images)} {name} images; precision/recall (k = '
                               f'{pr_lib.NEIGHBORHOOD_SIZE} neighbours) need more than {pr_lib.NEIGHBORHOOD_SIZE}.')
  notes = []
  if ref_images is not None and ref_images.shape[1:3] != samples.shape[1:3]:
    notes.append(f'sample size {samples.shape[1:3]} differs from reference size '
                 f'{ref_images.shape[1:3]}; the protocol compares images of the same size')
  if len(samples) != PROTOCOL_NUM_SAMPLES:
    notes.append(f'{len(samples)} samples: FID-{PROTOCOL_NUM_SAMPLES // 1000}K needs '
                 f'{PROTOCOL_NUM_SAMPLES}; numbers from fewer samples are biased upwards')
  for note in notes:
    logging.warning('Note: %s.', note)

  with inception_lib.InceptionV3(inception_graph, batch_size=batch_size, spec=spec) as net:
    ref_pool = None
    if ref_images is not None:
      ref_pool, ref_spatial = _features(net, ref_images, 'reference')
    if ref_pool is not None and (ref_stats is None or not ref_stats.has_spatial):
      logging.info(f'Reference statistics: computed from {IMAGES_KEY}.')
      ref_stats = fid_lib.FIDStatistics.from_features(ref_pool, ref_spatial)
      ref_source = 'computed'
    else:
      logging.info(f'Reference statistics: precomputed in {ref_path}.')
      ref_source = 'precomputed'
    sample_pool, sample_spatial = _features(net, samples, 'samples')
    logging.info('Inception Score (softmax of pool features)...')
    probs = net.softmax(sample_pool)

  for name, ref_mu, features in (('pool', ref_stats.mu, sample_pool),
                                 ('spatial', ref_stats.mu_s, sample_spatial)):
    if ref_mu is not None and ref_mu.shape[0] != features.shape[1]:
      raise errors.DataError(f'{ref_path}: reference {name} statistics have dimension {ref_mu.shape[0]} '
                             f'but {inception_graph} gives {features.shape[1]}: the reference was made '
                             'with another network; use ADM\'s reference batch and graph together.')
  sample_stats = fid_lib.FIDStatistics.from_features(sample_pool, sample_spatial)
  results = {'inception_score': inception_lib.inception_score(probs, is_split_size)}
  logging.info('FID (sqrtm of a [D, D] matrix; a minute for D = 2048)...')
  results['fid'] = sample_stats.fid(ref_stats)
  if ref_stats.has_spatial:
    logging.info('sFID...')
    results['sfid'] = sample_stats.sfid(ref_stats)
  else:
    results['sfid'] = None
    notes.append(f'sFID skipped: {ref_path} has neither {fid_lib.SPATIAL_KEYS} nor {IMAGES_KEY!r}')
    logging.warning('Note: %s.', notes[-1])
  if ref_pool is not None:
    logging.info(f'Precision/recall (k={pr_lib.NEIGHBORHOOD_SIZE}, {len(ref_pool)} x {len(sample_pool)})...')
    results['precision'], results['recall'] = pr_lib.precision_recall(
        ref_pool, sample_pool, precision=pr_precision)
  else:
    results['precision'] = results['recall'] = None
    notes.append(f'precision/recall skipped: {ref_path} has no {IMAGES_KEY!r} images')
    logging.warning('Note: %s.', notes[-1])

  results.update(
      num_samples=len(samples),
      num_reference_images=len(ref_images) if ref_images is not None else None,
      reference_statistics=ref_source,
      ref_batch=str(storage.path(ref_path)),
      sample_batch=str(storage.path(sample_path)),
      inception_graph=str(storage.path(inception_graph)),
      settings=dict(protocol='ADM (guided-diffusion evaluations/evaluator.py)',
                    batch_size=batch_size, is_split_size=is_split_size,
                    pr_neighborhood=pr_lib.NEIGHBORHOOD_SIZE, pr_precision=pr_precision),
      notes=notes)
  return results


def default_output_path(sample_path):
  """`samples.npz` -> `samples.eval.json`, beside the samples."""
  root = sample_path[:-4] if sample_path.endswith('.npz') else sample_path
  return root + '.eval.json'


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m groupdiff_jax.evaluation.evaluator',
      description='FID, sFID, IS, precision and recall as the ADM evaluator computes them.')
  parser.add_argument('ref_batch', help='reference batch npz (ADM: VIRTUAL_imagenet256_labeled.npz)')
  parser.add_argument('sample_batch', help='samples npz with arr_0 uint8 [N, 256, 256, 3]')
  parser.add_argument('--inception_graph', default=None,
                      help=f'path of classify_image_graph_def.pb (from {inception_lib.INCEPTION_URL})')
  parser.add_argument('--output_json', default=None, help='default: SAMPLE_BATCH.eval.json')
  parser.add_argument('--batch_size', type=int, default=inception_lib.FEATURE_BATCH_SIZE)
  parser.add_argument('--pr_precision', choices=pr_lib.PRECISIONS, default='adm_float16')
  args = parser.parse_args(argv)

  # Progress and notes on stderr: this argparse program is no absl app (a no-op where logging is set up).
  python_logging.basicConfig(level=python_logging.INFO, format='%(message)s')
  try:
    results = evaluate(args.ref_batch, args.sample_batch, args.inception_graph,
                       batch_size=args.batch_size, pr_precision=args.pr_precision)
  except errors.UserError as e:  # anything else is a bug: its traceback stays
    print(f'error: {e}', file=sys.stderr)
    return 2
  for key, label in (('inception_score', 'Inception Score'), ('fid', 'FID'), ('sfid', 'sFID'),
                     ('precision', 'Precision'), ('recall', 'Recall')):
    print(f'{label}: {results[key]}')  # the program's output
  output = args.output_json or default_output_path(args.sample_batch)
  storage.write_text(output, json.dumps(results, indent=2))
  print(f'Wrote {output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
