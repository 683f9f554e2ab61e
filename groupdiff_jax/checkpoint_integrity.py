"""Checksums of a checkpoint's array shards and the integrity check of a restored tree (checkpoint.py's module
docstring: "Integrity")."""

import json
import zlib

import google_crc32c
import jax
import numpy as np

from groupdiff_jax import errors, storage


def step_dir(manager, step):
  return manager.directory / str(step)


def _index_key(index, shape):
  """'0:4,0:3' for a shard's index (a tuple of slices) in its global array of `shape`."""
  return ','.join('%d:%d' % s.indices(n)[:2] for s, n in zip(index, shape))


def _leaf_name(path):
  """'opt_state/0/mu/blocks_0/attn/kernel': the same for a restored tree of dicts and lists as for the saved one
  of tuples, namedtuples and dataclasses."""
  parts = []
  for key in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
  return '/'.join(parts)


# Checksum algorithms by the name a checkpoint's metadata gives ('checksum_algorithm'); absent: 'crc32'
# (checkpoints written before CRC-32C was used).
CHECKSUMS = {'crc32c': google_crc32c.value, 'crc32': zlib.crc32}
CHECKSUM_ALGORITHM = 'crc32c'


def _checksum(array, algorithm):
  return CHECKSUMS[algorithm](np.ascontiguousarray(np.asarray(array)).reshape(-1).view(np.uint8))


def _local_shards(leaf):
  """[(index key, host array)] of the shards of `leaf` this process holds (replica 0 of each)."""
  if isinstance(leaf, jax.Array):
    return [(_index_key(shard.index, leaf.shape), np.asarray(shard.data))
            for shard in leaf.addressable_shards if shard.replica_id == 0]
  value = np.asarray(leaf)
  return [(_index_key((slice(None),) * value.ndim, value.shape), value)]


def shard_checksums(tree, algorithm=CHECKSUM_ALGORITHM):
  """{'leaf/path': {'0:4,0:3': checksum}} of the shards of `tree` this process owns (replica 0).

  The checksum is over the host copy of each shard's bytes (C order), the
  bytes orbax writes; a NumPy leaf is one shard covering the whole array.
  """
  sums = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    for key, data in _local_shards(leaf):
      sums.setdefault(_leaf_name(path), {})[key] = _checksum(data, algorithm)
  return sums


def _gather_checksums(sums):
  """Every process's shard tables merged (a small allgather of their JSON); one process: `sums`."""
  if jax.process_count() == 1:
    return sums
  from jax.experimental import multihost_utils
  encoded = np.frombuffer(json.dumps(sums).encode(), np.uint8)
  length = int(np.max(multihost_utils.process_allgather(np.int32(len(encoded)))))
  padded = np.zeros(length, np.uint8)
  padded[:len(encoded)] = encoded
  merged = {}
  for row in np.asarray(multihost_utils.process_allgather(padded)):
    for name, shards in json.loads(bytes(row).rstrip(b'\0').decode()).items():
      merged.setdefault(name, {}).update(shards)
  return merged


def _saved_checksums(manager, step):
  """(checksum tables, algorithm) saved with `step`; (None, None) without them."""
  try:
    metadata = storage.retry(lambda: manager.metadata(step), step_dir(manager, step)).custom_metadata or {}
  except errors.StorageUnavailable:
    raise
  except Exception:  # no or unreadable metadata: the restore itself decides
    return None, None
  return metadata.get('checksums'), metadata.get('checksum_algorithm', 'crc32')


def integrity_problem(manager, step, restored):
  """Why the restored tree of `step` cannot be trusted ('leaf ...: reason'), or None.

  Every shard's checksum must equal the one saved (checkpoints written
  before checksums existed have none: only the finiteness check applies),
  and every floating-point value must be finite. Each process checks only
  the shards it holds, on their host copies, with no collective, so hosts
  that disagree cannot deadlock here; the caller makes them agree.
  """
  saved, algorithm = _saved_checksums(manager, step)
  if saved is not None and algorithm not in CHECKSUMS:
    return f'unknown checksum algorithm {algorithm!r} (written by a newer version of this code?)'
  for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
    name = _leaf_name(path)
    expected = saved.get(name) if saved is not None else None
    if saved is not None and expected is None:
      return f'leaf {name} has no saved checksum'
    for index, data in _local_shards(leaf):
      if expected is not None and index in expected:
        crc = _checksum(data, algorithm)
        if expected[index] != crc:
          return f'leaf {name} (shard {index}): checksum {crc:#010x} != saved {expected[index]:#010x} (bit rot?)'
      if np.issubdtype(data.dtype, np.inexact) or data.dtype == jax.numpy.bfloat16:
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
          return f'leaf {name} holds {bad} non-finite value(s) (shard {index})'
  return None
