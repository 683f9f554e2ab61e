"""The sample job's directory, <workdir>/samples/: which groups each chunk holds, the chunk files, job.json
and the assembled ADM sample batch (groupdiff_jax/sample_job.py documents the files and runs the job).

Nothing here touches a device: every function reads or writes files, so a rerun can tell valid chunks from
missing, truncated, corrupt or stale ones before it generates anything.
"""

import dataclasses
import json
import time
import zipfile

import numpy as np
from absl import logging
from etils import epath

from groupdiff_jax import errors, storage

SAMPLES_DIR = 'samples'
JOB_FILE = 'job.json'
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip entry times: the assembled npz is byte-identical run to run
# config.sample fields that change how the output is written or measured, not the images.
OUTPUT_ONLY_FIELDS = ('decode_batch_size', 'grid_groups', 's_cross', 's_cross_stages', 's_cross_groups')


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """num_groups groups of images_per_group, groups_per_chunk at a time."""
  num_groups: int
  images_per_group: int
  groups_per_chunk: int
  num_classes: int

  @property
  def num_chunks(self):
    return -(-self.num_groups // self.groups_per_chunk)

  @property
  def num_images(self):
    return self.num_groups * self.images_per_group

  def groups(self, chunk):
    """[start, stop) of the real groups of `chunk`."""
    start = chunk * self.groups_per_chunk
    return start, min(start + self.groups_per_chunk, self.num_groups)

  def labels(self, chunk):
    """int32 [groups_per_chunk * N]: every slot of the chunk, the empty ones of the last chunk included."""
    start = chunk * self.groups_per_chunk
    groups = np.arange(start, start + self.groups_per_chunk) % self.num_classes
    return np.repeat(groups, self.images_per_group).astype(np.int32)

  def num_chunk_images(self, chunk):
    start, stop = self.groups(chunk)
    return (stop - start) * self.images_per_group

  def chunks_of_process(self, process_index, process_count):
    """The chunks process `process_index` generates: c % process_count == process_index."""
    return list(range(process_index, self.num_chunks, process_count))


def plan_from_config(config):
  s = config.sample
  if s.num_groups < 1 or s.groups_per_batch < 1:
    raise errors.ConfigError(f'sample.num_groups={s.num_groups} and sample.groups_per_batch={s.groups_per_batch} '
                             'must be positive (e.g. --config.sample.num_groups=8 --config.sample.groups_per_batch=8).')
  return ChunkPlan(s.num_groups, s.images_per_group, min(s.groups_per_batch, s.num_groups),
                   config.model.num_classes)


def chunk_path(samples_dir, chunk):
  return str(epath.Path(samples_dir) / f'chunk_{chunk:06d}.npz')


class SamplesDirError(errors.DataError, RuntimeError):
  """<workdir>/samples/ lost or changed a chunk between generation and assembly (RuntimeError: as before)."""


def write_atomically(path, write):
  """write(file object) into path + '.tmp', then rename it onto path (in a bucket: one object upload)."""
  storage.write_atomically(path, write)


def write_json(path, record):
  write_atomically(path, lambda f: f.write(json.dumps(record, indent=2).encode()))


def read_chunk(path, plan, chunk, need_s_cross=False):
  """The arrays of a complete chunk file, or None (missing, truncated, corrupt or not this chunk's)."""
  if not storage.retry(epath.Path(path).exists, path):
    return None
  try:
    arrays = storage.retry(lambda: _load_npz(path), path)
  except errors.StorageUnavailable:
    raise
  except Exception as error:  # OSError, ValueError, EOFError, BadZipFile; tf.errors.* for a bucket object
    logging.warning('Chunk file %s is unreadable (%s); generating it again.', path, error)
    return None
  count = plan.num_chunk_images(chunk)
  images, labels = arrays.get('images'), arrays.get('labels')
  if (images is None or labels is None or images.dtype != np.uint8 or images.ndim != 4 or len(images) != count
      or not np.array_equal(labels, plan.labels(chunk)[:count])):
    logging.warning('Chunk file %s does not hold chunk %d; generating it again.', path, chunk)
    return None
  if 'nfe' not in arrays or (need_s_cross and 's_cross_mass' not in arrays):
    return None
  return arrays


def _load_npz(path):
  with epath.Path(path).open('rb') as f, np.load(f) as data:
    return {name: data[name] for name in data.files}


def valid_chunk(samples_dir, plan, chunk, need_s_cross=False):
  """read_chunk of a chunk the job generated already; SamplesDirError when it went missing or bad since."""
  path = chunk_path(samples_dir, chunk)
  arrays = read_chunk(path, plan, chunk, need_s_cross)
  if arrays is None:
    raise SamplesDirError(f'{path} is missing or invalid: rerun the same sample command to generate it again '
                          '(with several hosts, --workdir must be on storage that every host sees).')
  return arrays


def job_record(config, step):
  """What the chunks depend on (compared on resume), JSON-normalised."""
  sample_fields = {k: v for k, v in config.sample.to_dict().items() if k not in OUTPUT_ONLY_FIELDS}
  record = dict(sample=sample_fields, model=config.model.to_dict(), seed=config.seed, checkpoint_step=step)
  return json.loads(json.dumps(record))


def prepare_directory(samples_dir, record):
  """Process 0: create samples_dir, or move it aside if its chunks come from other settings."""
  samples_dir = epath.Path(samples_dir)
  job_path = samples_dir / JOB_FILE
  previous = None
  if job_path.exists():
    try:
      previous = errors.read_json_object(job_path, SamplesDirError, 'its chunks are treated as stale.')
    except SamplesDirError as e:  # e.g. cut short by a crash: not the user's to fix, the chunks are redone
      logging.warning('%s', e)
  if previous is not None:
    if previous == record:
      return
    changed = sorted(f'{section}.{k}' for section in ('sample', 'model') for k in
                     set(previous.get(section, {})) | set(record[section])
                     if previous.get(section, {}).get(k) != record[section].get(k))
    changed += [k for k in ('seed', 'checkpoint_step') if previous.get(k) != record[k]]
    _move_aside(samples_dir, f'samples of other settings ({", ".join(changed)})')
  elif job_path.exists() or (samples_dir.is_dir() and list(samples_dir.glob('chunk_*.npz'))):
    _move_aside(samples_dir, f'chunks without a readable {JOB_FILE}')
  samples_dir.mkdir(parents=True, exist_ok=True)
  write_json(job_path, record)


def _move_aside(samples_dir, what):
  aside = f'{samples_dir}_stale_{time.strftime("%Y%m%d-%H%M%S")}'
  logging.warning('%s holds %s; moved it to %s.', samples_dir, what, aside)
  storage.move_tree(samples_dir, aside)


def _zip_entry(name):
  info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
  info.compress_type = zipfile.ZIP_STORED  # as np.savez
  return info


def samples_path(samples_dir, num_images, image_side):
  """<samples_dir>/samples_<N>x<H>x<W>x3.npz, the ADM sample batch."""
  return str(epath.Path(samples_dir) / f'samples_{num_images}x{image_side}x{image_side}x3.npz')


def assemble(samples_dir, plan, image_side):
  """Stream every chunk into samples_<N>x<H>x<W>x3.npz (arr_0 uint8 [N, H, W, 3], labels int32 [N]).

  One chunk in memory at a time; greyscale is repeated to RGB (the ADM
  evaluator reads 3 channels). Returns the path.
  """
  shape = (plan.num_images, image_side, image_side, 3)
  path = samples_path(samples_dir, plan.num_images, image_side)
  labels = []

  def write(f):
    with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as archive:
      with archive.open(_zip_entry('arr_0.npy'), 'w', force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(
            member, {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)), 'fortran_order': False,
                     'shape': shape})
        for chunk in range(plan.num_chunks):
          arrays = valid_chunk(samples_dir, plan, chunk)
          images = arrays['images']
          if images.shape[1:3] != shape[1:3]:
            raise SamplesDirError(f'{chunk_path(samples_dir, chunk)} holds images of {images.shape[1:3]}, not '
                                  f'{shape[1:3]}: move {samples_dir} away and sample again.')
          rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
          member.write(np.ascontiguousarray(rgb).tobytes())
          labels.append(arrays['labels'])
      with archive.open(_zip_entry('labels.npy'), 'w') as member:
        np.lib.format.write_array(member, np.concatenate(labels).astype(np.int32), version=(1, 0))

  write_atomically(path, write)
  return path


def chunk_nfes(samples_dir, plan):
  """The NFE per branch each chunk's sampler used (differs between chunks only for dopri5)."""
  nfes = []
  for chunk in range(plan.num_chunks):
    nfes.append(int(valid_chunk(samples_dir, plan, chunk)['nfe']))
  return nfes


def first_groups(samples_dir, plan, num_groups):
  """uint8 [<= num_groups * N, H, W, C] of the first groups, from the chunk files."""
  wanted = min(num_groups, plan.num_groups) * plan.images_per_group
  images, chunk = [], 0
  while sum(len(i) for i in images) < wanted:
    images.append(valid_chunk(samples_dir, plan, chunk)['images'])
    chunk += 1
  return np.concatenate(images)[:wanted]


def nfe_summary(nfes):
  """One number when every chunk used the same NFE (fixed-step samplers), else min/mean/max (dopri5)."""
  if len(set(nfes)) == 1:
    return nfes[0]
  return dict(min=min(nfes), mean=float(np.mean(nfes)), max=max(nfes))


def gather_s_cross(samples_dir, plan, sample_config):
  """Masses [S_on, L, G, n, n] of the first sample.s_cross_groups groups, from the chunk files."""
  layers, masses, chunk = None, [], 0
  while chunk < plan.num_chunks and plan.groups(chunk)[0] < sample_config.s_cross_groups:
    arrays = valid_chunk(samples_dir, plan, chunk, need_s_cross=True)
    layers = arrays['s_cross_layers']
    masses.append(arrays['s_cross_mass'])
    chunk += 1
  return layers, np.concatenate(masses, axis=2)
