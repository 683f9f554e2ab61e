"""Numbered, atomically written shards: how the data jobs resume without duplicates or gaps.

A job splits its M rows into shards of `shard_size` consecutive rows.
Shard k (rows [k*S, min((k+1)*S, M))) is written to a temporary file and
renamed into `shards/{k:06d}.npz`, so a shard on disk is always complete; a
rerun skips the shards present and computes the rest. Hosts take the
shards k with k % process_count == process_index. `job.json` records the
settings of the first run; a rerun with other settings is refused (mixed
shards would make a store of two kinds). `progress_{host}.json` holds the
latest progress line of each host. `finalize` concatenates the shards, in
order, into the final arrays once every shard exists.
"""

import json
import os
import time

import numpy as np

from groupdiff_jax import errors
from numpy.lib import format as npy_format

SHARD_DIR = 'shards'


class ShardError(errors.UserError, RuntimeError):
  """Shards that cannot be resumed or finalised; the message says what to do."""


class ShardedJob:
  """The shard bookkeeping of one job's output directory."""

  def __init__(self, output_dir, settings, num_rows, shard_size, process_index=0, process_count=1):
    self.output_dir, self.num_rows, self.shard_size = output_dir, num_rows, shard_size
    self.process_index, self.process_count = process_index, process_count
    self.num_shards = -(-num_rows // shard_size)
    self.shard_dir = os.path.join(output_dir, SHARD_DIR)
    os.makedirs(self.shard_dir, exist_ok=True)
    settings = dict(settings, num_rows=num_rows, shard_size=shard_size)
    path = os.path.join(output_dir, 'job.json')
    if os.path.exists(path):
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
    return os.path.join(self.shard_dir, f'{shard:06d}.npz')

  def done(self):
    return sorted(s for s in range(self.num_shards) if os.path.exists(self.path(s)))

  def todo(self):
    """This host's shards not yet on disk."""
    return [s for s in range(self.process_index, self.num_shards, self.process_count) if not os.path.exists(self.path(s))]

  def write(self, shard, **arrays):
    start, end = self.rows(shard)
    for name, value in arrays.items():
      if len(value) != end - start:
        raise ShardError(f'shard {shard}: {name} has {len(value)} rows, expected {end - start} (rows {start}:{end}).')
    tmp = self.path(shard) + f'.tmp{self.process_index}.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, self.path(shard))

  def read(self, shard):
    with np.load(self.path(shard)) as data:
      return {k: data[k] for k in data.files}

  def report(self, line):
    _write_json(os.path.join(self.output_dir, f'progress_{self.process_index}.json'),
                {'time': time.strftime('%Y-%m-%d %H:%M:%S'), 'line': line, 'shards_done': len(self.done()),
                 'num_shards': self.num_shards})

  def finalize(self, outputs):
    """Concatenate every shard into .npy files: outputs {array name in shard: file name}. Returns paths."""
    missing = [s for s in range(self.num_shards) if not os.path.exists(self.path(s))]
    if missing:
      raise ShardError(f'{self.shard_dir}: {len(missing)} of {self.num_shards} shards missing (first: {missing[0]}); '
                       f'run the job again with the same flags (every host) to finish them.')
    first = self.read(0)
    files = {}
    for name, file_name in outputs.items():
      sample = first[name]
      path = os.path.join(self.output_dir, file_name)
      files[name] = npy_format.open_memmap(path + '.tmp.npy', mode='w+', dtype=sample.dtype,
                                           shape=(self.num_rows,) + sample.shape[1:])
    for shard in range(self.num_shards):
      data = self.read(shard)
      start, end = self.rows(shard)
      for name, array in files.items():
        if len(data[name]) != end - start:
          raise ShardError(f'{self.path(shard)}: {len(data[name])} rows of {name}, expected {end - start}; delete '
                           f'this shard file and run the job again to redo it.')
        array[start:end] = data[name]
    paths = []
    for name, array in files.items():
      array.flush()
      del array
      path = os.path.join(self.output_dir, outputs[name])
      os.replace(path + '.tmp.npy', path)
      paths.append(path)
    return paths


def _write_json(path, value):
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)
