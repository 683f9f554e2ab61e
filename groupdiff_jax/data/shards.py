"""Numbered, atomically written shards: how the data jobs resume without duplicates or gaps.

A job splits its M rows into shards of `shard_size` consecutive rows.
Shard k (rows [k*S, min((k+1)*S, M))) is written to a temporary file and
renamed into `shards/{k:06d}.npz` (in a bucket: one object upload), so a
shard on disk is always complete; a
rerun skips the shards present and computes the rest. Hosts take the
shards k with k % process_count == process_index. `job.json` records the
settings of the first run; a rerun with other settings is refused (mixed
shards would make a store of two kinds). `progress_{host}.json` holds the
latest progress line of each host. `finalize` concatenates the shards, in
order, into the final arrays once every shard exists.
"""

import json
import time

import numpy as np
from etils import epath
from numpy.lib import format as npy_format

from groupdiff_jax import errors, storage

SHARD_DIR = 'shards'


class ShardError(errors.UserError, RuntimeError):
  """Shards that cannot be resumed or finalised; the message says what to do."""


class ShardedJob:
  """The shard bookkeeping of one job's output directory."""

  def __init__(self, output_dir, settings, num_rows, shard_size, process_index=0, process_count=1):
    self.output_dir, self.num_rows, self.shard_size = output_dir, num_rows, shard_size
    self.process_index, self.process_count = process_index, process_count
    self.num_shards = -(-num_rows // shard_size)
    self.shard_dir = str(storage.path(output_dir) / SHARD_DIR)
    storage.retry(lambda: epath.Path(self.shard_dir).mkdir(parents=True, exist_ok=True), self.shard_dir)
    settings = dict(settings, num_rows=num_rows, shard_size=shard_size)
    path = storage.path(output_dir) / 'job.json'
    if path.exists():
      previous = errors.read_json_object(path, ShardError, f'restart the job with a new --output_dir (or delete '
                                         f'{output_dir} to start over).')
      changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
      if changed:
        raise ShardError(f'{path}: this directory was started with other settings {changed} (before, now); '
                         f'resume with the same flags, or use a new --output_dir.')
    elif process_index == 0:
      _write_json(path, settings)
    self.settings = settings

  def rows(self, shard):
    return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_rows)

  def path(self, shard):
    return str(epath.Path(self.shard_dir) / f'{shard:06d}.npz')

  def _exists(self, shard):
    return storage.retry(epath.Path(self.path(shard)).exists, self.path(shard))

  def done(self):
    return sorted(s for s in range(self.num_shards) if self._exists(s))

  def todo(self):
    """This host's shards not yet on disk."""
    return [s for s in range(self.process_index, self.num_shards, self.process_count) if not self._exists(s)]

  def write(self, shard, **arrays):
    start, end = self.rows(shard)
    for name, value in arrays.items():
      if len(value) != end - start:
        raise ShardError(f'shard {shard}: {name} has {len(value)} rows, expected {end - start} (rows {start}:{end}).')
    storage.write_atomically(self.path(shard), lambda f: np.savez(f, **arrays))

  def read(self, shard):
    return storage.load_npz(self.path(shard))

  def report(self, line):
    _write_json(storage.path(self.output_dir) / f'progress_{self.process_index}.json',
                {'time': time.strftime('%Y-%m-%d %H:%M:%S'), 'line': line, 'shards_done': len(self.done()),
                 'num_shards': self.num_shards})

  def finalize(self, outputs):
    """Concatenate every shard into .npy files: outputs {array name in shard: file name}. Returns paths."""
    missing = [s for s in range(self.num_shards) if not self._exists(s)]
    if missing:
      raise ShardError(f'{self.shard_dir}: {len(missing)} of {self.num_shards} shards missing (first: {missing[0]}); '
                       f'run the job again with the same flags (every host) to finish them.')
    first = self.read(0)
    paths = []
    for name, file_name in outputs.items():  # streamed: one shard in memory at a time, any storage
      sample = first[name]
      path = str(storage.path(self.output_dir) / file_name)

      def write(f, name=name, sample=sample):
        npy_format.write_array_header_1_0(f, {'descr': npy_format.dtype_to_descr(sample.dtype),
                                              'fortran_order': False, 'shape': (self.num_rows,) + sample.shape[1:]})
        for shard in range(self.num_shards):
          data = self.read(shard)
          start, end = self.rows(shard)
          if len(data[name]) != end - start:
            raise ShardError(f'{self.path(shard)}: {len(data[name])} rows of {name}, expected {end - start}; '
                             f'delete this shard file and run the job again to redo it.')
          f.write(np.ascontiguousarray(data[name], sample.dtype).tobytes())
      storage.write_atomically(path, write)
      paths.append(path)
    return paths


def _write_json(path, value):
  storage.write_atomically(path, lambda f: f.write(json.dumps(value, indent=2, sort_keys=True).encode()))
