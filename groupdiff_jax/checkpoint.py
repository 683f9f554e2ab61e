"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Writes are atomic (orbax writes `<step>.orbax-checkpoint-tmp-*` and renames
it when every host has finished; unfinished ones are never listed), old
steps are pruned to `max_to_keep`. A listed checkpoint that does not
restore (files deleted or truncated, e.g. a disk that filled up or a copy
interrupted outside orbax) is moved to `<workdir>/checkpoints_corrupt/`
with a warning naming it and the step used instead, and the next older one
is tried.

Integrity. Every save records, in the checkpoint's custom metadata, the
step, the config and the code version, and a CRC-32C of every array shard
(each process hashes the shards it owns, replica 0, on the host copy; the
small tables are gathered to process 0, which writes the metadata;
google-crc32c's hardware CRC, ~10 GB/s a core, keeps it a small part of the
save, docs/benchmarks.md). A restore recomputes the checksum of every shard
it reads (with the algorithm the checkpoint names: older checkpoints carry
zlib's CRC-32) and checks that every
floating-point leaf is finite; a mismatch (bit rot, a partial copy) or a
NaN/inf is treated exactly like an unreadable checkpoint: moved aside with
a warning naming the checkpoint and the leaf, and the previous one used.

Save failures. Orbax writes in a background thread; `check_save` (called
after every step) turns a failed write into one `CheckpointSaveError`
naming the step directory and the OS error, and `saving` (a context
manager around the loop) finishes or abandons the in-flight save before
any exception leaves the loop, so the real error is the last one printed.

Storage faults are not corruption. The workdir may be a bucket (storage.py).
A transient storage error (timeout, reset connection, HTTP 429/5xx) while
listing, restoring or reading a checkpoint's metadata is retried with
backoff and then raises errors.StorageUnavailable (exit 75: retry), moving
nothing; a save that fails that way raises it too, after the in-flight save
is abandoned and its leftovers removed. Only a checkpoint that restores
wrong (checksum, non-finite leaf) or not at all for another reason (missing
or truncated files, another tree or shape) is moved aside.
"""

import contextlib
import json
import re
import time

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from groupdiff_jax import errors, storage, weights_io
# Re-exported: checkpoint.shard_checksums, checkpoint.integrity_problem, ... as before the split.
from groupdiff_jax.checkpoint_integrity import (CHECKSUM_ALGORITHM, CHECKSUMS, _gather_checksums,  # noqa: F401
                                                integrity_problem, shard_checksums, step_dir)

# The TrainState fields that are saved (apply_fn and tx are code, not state).
SAVED_FIELDS = ('step', 'params', 'ema_params', 'opt_state', 'rng')
CORRUPT_DIR = 'checkpoints_corrupt'
# Params a "from pretrained" start may lack: a plain DiT/SiT has no sample embedding (GroupDiff adds it).
FRESH_IF_ABSENT = ('sample_embedder',)


def checkpoint_manager(workdir, max_to_keep=3, create=True):
  """The manager of `<workdir>/checkpoints` (local or a bucket); `create=False` (reading only) makes no folder.

  Listing the steps is retried while storage fails transiently (storage.retry: StorageUnavailable after that).
  """
  directory = storage.path(workdir) / 'checkpoints'
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, read_only=not create,
                                         cleanup_tmp_directories=create)
  return storage.retry(lambda: ocp.CheckpointManager(directory, options=options), directory)


def _saved_tree(state):
  return {name: getattr(state, name) for name in SAVED_FIELDS}


class NoRestorableCheckpoint(errors.WeightsError, RuntimeError):
  """Every checkpoint in the directory is corrupt or unreadable (RuntimeError: as before). Storage that is
  unreachable raises errors.StorageUnavailable instead (exit 75, not a user error)."""


class CheckpointSaveError(errors.UserError, OSError):
  """A checkpoint could not be written (disk full, permissions); names the path and the OS error. A transient
  storage fault raises errors.StorageUnavailable instead (exit 75: retry)."""


def code_version():
  try:
    from importlib import metadata
    return metadata.version('groupdiff_jax')
  except Exception:  # not installed (PYTHONPATH checkout)
    return 'unknown'


def save(manager, state, force=False, config=None):
  """Save `state` under its step (asynchronously; `wait` before exiting).

  Does nothing when that step is already saved (e.g. a preemption right
  after a periodic save). `force` saves whatever the manager's policy.
  The checkpoint's metadata holds the step, `config` (a ConfigDict, as
  JSON), the code version and every shard's CRC-32C (see the module
  docstring).
  """
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return False
  check_save(manager)
  tree = _saved_tree(state)
  metadata = {'step': step, 'code_version': code_version(), 'checksum_algorithm': CHECKSUM_ALGORITHM,
              'checksums': _gather_checksums(shard_checksums(tree, CHECKSUM_ALGORITHM)),
              'config': json.loads(config.to_json_best_effort()) if config is not None else None}
  try:
    return manager.save(step, args=ocp.args.StandardSave(tree), force=force, custom_metadata=metadata)
  except Exception as error:
    failure = save_error(manager, error)
    if failure is None:
      raise  # not the storage: a bug, keep its traceback
    if isinstance(failure, errors.StorageUnavailable):
      _abandon(manager)
    raise failure from None


# tensorstore's message for a failed file write: ... Failed writing: "<path>": ...: <strerror> [os_error_code='28']
_TENSORSTORE_OS_ERROR = re.compile(r'(?:Failed writing: "(?P<path>[^"]+)".*: )?(?P<strerror>[^:\[]+?) '
                                   r"\[os_error_code='(?P<errno>\d+)'\]")


def _storage_error(error):
  """'<path>: [Errno 28] No space left on device' for the innermost OS error in `error`'s cause/context chain
  (an OSError, or tensorstore's ValueError carrying an os_error_code), else None."""
  seen, todo, found = set(), [error], None
  while todo:
    current = todo.pop()
    if current is None or id(current) in seen:
      continue
    seen.add(id(current))
    if isinstance(current, OSError) and current.strerror:
      found = (f'{current.filename}: ' if current.filename else '') + f'[Errno {current.errno}] {current.strerror}'
    else:
      match = _TENSORSTORE_OS_ERROR.search(str(current))
      if match:
        found = ((f'{match["path"]}: ' if match['path'] else '')
                 + f'[Errno {match["errno"]}] {match["strerror"].strip()}')
    todo += [current.__cause__, current.__context__, *getattr(current, 'exceptions', ())]
  return found


def save_error(manager, error):
  """One CheckpointSaveError for a failed save (its last words: the path and the OS error), StorageUnavailable
  for a transient storage fault, or None when `error` is not a storage error (a bug: the caller re-raises it
  with its traceback)."""
  if storage.is_transient(error):
    return storage.unavailable(manager.directory, error, retried=False)  # the clients retried the writes
  reason = _storage_error(error)
  if reason is None:
    return None
  return CheckpointSaveError(f'Saving a checkpoint in {manager.directory} failed (the run stops; checkpoints saved '
                             f'before are intact; free space or fix the storage, then rerun to resume): '
                             f'{reason}')


def check_save(manager):
  """Raise CheckpointSaveError now if a background save has failed (cheap; call after every step)."""
  try:
    manager.check_for_errors()  # the writer thread's error (orbax re-raises it once, of any type)
    if not manager.is_saving_in_progress():
      manager.wait_until_finished()  # returns at once; raises the finalize thread's error
  except Exception as error:
    failure = save_error(manager, error)
    if failure is None:
      raise  # not the storage: a bug, keep its traceback
    if isinstance(failure, errors.StorageUnavailable):
      _abandon(manager)
    raise failure from None


def _abandon(manager):
  """After a save failed for good: wait for orbax's threads to stop, then clean what the save left."""
  try:
    manager.wait_until_finished()
  except Exception:  # the same failure, already reported by the caller
    pass
  _clean_unfinished(manager)


@contextlib.contextmanager
def saving(manager):
  """Around the training loop: whatever ends it, the in-flight save is finished (or its failure reported)
  before the exception leaves, so the loop's own error stays the last thing printed."""
  try:
    yield
  except BaseException:
    try:
      manager.wait_until_finished()
    except Exception as error:  # the save failed too: report it, then the loop's error
      logging.error('%s', save_error(manager, error) or f'Saving a checkpoint failed: {error!r}')
    raise
  check_save(manager)
  try:
    manager.wait_until_finished()
  except Exception as error:
    failure = save_error(manager, error)
    if failure is None:
      raise
    if isinstance(failure, errors.StorageUnavailable):
      _clean_unfinished(manager)
    raise failure from None


def _clean_unfinished(manager):
  """Remove what an interrupted save left in the manager's directory (orbax's `*.orbax-checkpoint-tmp-*`
  folders, or on a bucket a step folder without its commit marker); best effort: storage may be gone."""
  try:
    for entry in manager.directory.iterdir():
      unfinished = ('.orbax-checkpoint-tmp-' in entry.name
                    or (entry.name.isdigit() and int(entry.name) not in manager.all_steps()
                        and not (entry / 'commit_success.txt').exists()))
      if unfinished and jax.process_index() == 0:
        entry.rmtree()
        logging.warning('Removed the unfinished checkpoint %s.', entry)
  except Exception as error:  # storage down: the next run's listing ignores unfinished steps
    logging.warning('Could not clean unfinished checkpoints in %s (%s).', manager.directory, storage.first_line(error))


def _restore_newest_valid(manager, args, move_aside):
  """(step, restored tree) of the newest checkpoint that restores, or (None, None).

  A checkpoint that fails is reported and, if `move_aside`, moved out of the
  manager's directory (by process 0, then all hosts re-list), so that the
  run does not save onto or resume from it again.
  """
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      # A transient storage fault is retried, then raises StorageUnavailable: nothing is moved aside.
      restored = storage.retry(lambda: manager.restore(step, args=args), step_dir(manager, step))
    except errors.StorageUnavailable:
      raise
    except Exception as error:  # orbax/tensorstore raise many types for missing or truncated files
      failed.append((step, step_dir(manager, step), storage.first_line(error)))
      continue
    problem = integrity_problem(manager, step, restored)
    if jax.process_count() > 1:  # every host must take the same decision (each checks its own shards)
      from jax.experimental import multihost_utils
      if np.any(multihost_utils.process_allgather(np.int32(problem is not None))) and problem is None:
        problem = 'another host found a corrupt shard (see its log)'
    if problem:
      failed.append((step, step_dir(manager, step), problem))
      continue
    for _, path, reason in failed:
      logging.warning('Checkpoint %s is unreadable or corrupt (%s); resuming from the previous valid checkpoint %s '
                      'instead.', path, reason, step_dir(manager, step))
    if failed and move_aside:
      _move_aside(manager, [s for s, _, _ in failed])
    return step, restored
  if failed:
    listing = '; '.join(f'{path} ({reason})' for _, path, reason in failed)
    raise NoRestorableCheckpoint(f'No checkpoint in {manager.directory} can be restored: {listing}. Move the '
                                 'directory away to start from scratch, or restore it from a backup.')
  return None, None


def _move_aside(manager, steps):
  target = manager.directory.parent / CORRUPT_DIR
  if jax.process_index() == 0:
    storage.retry(lambda: target.mkdir(parents=True, exist_ok=True), target)
    for step in steps:
      destination = target / f'{step}-{int(time.time())}'
      storage.move_tree(step_dir(manager, step), destination)
      logging.warning('Moved the unreadable checkpoint of step %d to %s.', step, destination)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('groupdiff_jax.checkpoint.move_aside')
  manager.reload()


def restore_latest(manager, state):
  """The newest valid checkpoint restored into `state`'s structure and shardings.

  Returns `state` itself when there is no checkpoint. Params, EMA,
  optimizer state, step and the base PRNG key are all restored; with the
  data stream a pure function of (seed, step), the run continues exactly.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved_tree(state))
  step, restored = _restore_newest_valid(manager, ocp.args.StandardRestore(abstract), move_aside=True)
  if step is None:
    return state
  return state.replace(**restored)


def load_params(workdir, use_ema=True):
  """Model parameters of the newest valid checkpoint in workdir (for sampling).

  Returns (params, step). Unreadable checkpoints are skipped with a warning
  but left in place (sampling does not change the workdir).
  """
  directory = storage.path(workdir) / 'checkpoints'
  missing = errors.MissingInputError(f'No checkpoint in {directory}: train first with '
                                     f'`python -m groupdiff_jax.main --mode=train --workdir={workdir} --config=...`.')
  if not storage.retry(directory.exists, directory):
    raise missing  # and creates nothing (a failed command leaves no folder behind)
  manager = checkpoint_manager(workdir, create=False)
  step, restored = _restore_newest_valid(manager, ocp.args.StandardRestore(), move_aside=False)
  if step is None:
    raise missing
  return restored['ema_params' if use_ema else 'params'], step


def flat_params(tree):
  """{'blocks_0/attn/qkv/kernel': leaf} of a nested params dict."""
  return {'/'.join(path): leaf for path, leaf in flax.traverse_util.flatten_dict(tree).items()}


def _place_like(values, target, keep=()):
  """Params shaped as `target` (jax arrays) with host values {'a/b/c': array}, on target's shardings and
  dtypes (each process fills its own shards); the leaves named in `keep` stay target's own."""
  placed = {}
  for path, leaf in flax.traverse_util.flatten_dict(target).items():
    name = '/'.join(path)
    if name in keep:
      placed[path] = leaf
    else:
      value = np.asarray(values[name], leaf.dtype)
      placed[path] = jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index, v=value: v[index])
  return flax.traverse_util.unflatten_dict(placed)


def config_fields_for(names):
  """The config fields that decide the params `names` ('blocks_3/attn/qkv/kernel', ...)."""
  fields = []
  for name in names:
    module = name.split('/')[0]
    if module.startswith('blocks_'):
      field = 'model.depth (blocks), model.hidden_size / model.variant (widths)'
    elif module == 'sample_embedder':
      field = 'model.max_group_size'
    elif module == 'final_layer':
      field = 'model.learn_sigma, model.patch_size / model.variant, model.hidden_size'
    elif module == 'y_embedder':
      field = 'model.num_classes, model.hidden_size'
    elif module == 'x_embedder':
      field = 'model.in_channels, model.patch_size / model.variant, model.hidden_size'
    else:
      field = 'model.variant, model.hidden_size'
    if field not in fields:
      fields.append(field)
  return fields


def check_param_tree(source, target, what, allowed_missing=()):
  """Raise one WeightsError unless `source` has exactly `target`'s param paths and shapes.

  Args:
    source: {'a/b/kernel': array or shape-bearing leaf} from a checkpoint.
    target: the same for the model the config builds (e.g. jax.eval_shape).
    what: names the checkpoint in the message.
    allowed_missing: target paths the checkpoint may lack.
  """
  shape = lambda leaf: tuple(np.shape(leaf))
  missing = [f'{name}: expected {shape(target[name])}' for name in sorted(target)
             if name not in source and name not in allowed_missing]
  extra = [f'{name}: {shape(source[name])}' for name in sorted(source) if name not in target]
  wrong = [f'{name}: expected {shape(target[name])}, found {shape(source[name])}'
           for name in sorted(target) if name in source and shape(source[name]) != shape(target[name])]
  if missing or extra or wrong:
    names = [line.split(':')[0] for line in missing + extra + wrong]
    raise errors.WeightsError(weights_io.mismatch_message(
        f'{what} does not fit the configured model; make these config fields those of the checkpoint: '
        f'{"; ".join(config_fields_for(names))}.',
        [('params missing there', missing), ('params not in this model', extra), ('wrong shapes', wrong)]))


def init_params_from(state, path):
  """`state` (fresh, step 0) with params and EMA taken from the newest checkpoint in `path`.

  For `train.init_from`: fine-tuning from imported weights (convert.py's
  output directory) or from another run's workdir, with this run's fresh
  optimizer state, step 0 and base key. The checkpoint's `ema_params` (the
  weights one samples with; convert.py writes the same under both names)
  become both params and EMA. Every param of `state` must be in the
  checkpoint with its shape, except a sample embedding that the checkpoint
  lacks (a plain DiT/SiT run, FRESH_IF_ABSENT), which keeps its fresh
  initialisation, with a warning. Leaves keep `state`'s dtypes and shardings.

  Raises:
    FileNotFoundError: `path` holds no checkpoint.
    WeightsError (a ValueError): params missing from the checkpoint, extra
      there, or of another shape, each named by its param path, with the
      config fields to change (check_param_tree).
  """
  manager_dir = storage.path(path) / 'checkpoints'
  if not storage.retry(manager_dir.is_dir, manager_dir):
    raise errors.MissingInputError(f'train.init_from={path!r}: no checkpoint directory {manager_dir}. Pass the '
                                   '--output directory of `python -m groupdiff_jax.convert` or the workdir of a '
                                   'training run.')
  manager = checkpoint_manager(path, create=False)
  step, restored = _restore_newest_valid(manager, ocp.args.StandardRestore(), move_aside=False)
  if step is None:
    raise errors.MissingInputError(f'train.init_from={path!r}: {manager_dir} holds no checkpoint; point '
                                   'train.init_from at a directory with a saved checkpoint.')
  source = flat_params(jax.device_get(restored['ema_params']))
  target = flat_params(state.params)
  source_modules = {name.split('/')[0] for name in source}
  fresh = [name for name in target
           if name.split('/')[0] in FRESH_IF_ABSENT and name.split('/')[0] not in source_modules]
  check_param_tree(source, target, f'train.init_from={path!r} (step {step})', allowed_missing=fresh)
  for name in fresh:
    logging.warning('%s is not in train.init_from=%s: it keeps its fresh initialisation.', name, path)
  logging.info('Initialised params and EMA from %s; optimizer state and step are fresh.', step_dir(manager, step))
  return state.replace(params=_place_like(source, state.params, keep=fresh),
                       ema_params=_place_like(source, state.ema_params, keep=fresh))
