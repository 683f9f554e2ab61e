"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Writes are atomic (orbax writes `<step>.orbax-checkpoint-tmp-*` and renames
it when every host has finished; unfinished ones are never listed), old
steps are pruned to `max_to_keep`. A listed checkpoint that does not
restore (files deleted or truncated, e.g. a disk that filled up or a copy
interrupted outside orbax) is moved to `<workdir>/checkpoints_corrupt/`
with a warning naming it and the step used instead, and the next older one
is tried.
"""

import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp

# The TrainState fields that are saved (apply_fn and tx are code, not state).
SAVED_FIELDS = ('step', 'params', 'ema_params', 'opt_state', 'rng')
CORRUPT_DIR = 'checkpoints_corrupt'


def checkpoint_manager(workdir, max_to_keep=3):
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory, options=options)


def _saved_tree(state):
  return {name: getattr(state, name) for name in SAVED_FIELDS}


def save(manager, state, force=False):
  """Save `state` under its step (asynchronously; `wait` before exiting).

  Does nothing when that step is already saved (e.g. a preemption right
  after a periodic save). `force` saves whatever the manager's policy.
  """
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return False
  return manager.save(step, args=ocp.args.StandardSave(_saved_tree(state)), force=force)


def step_dir(manager, step):
  return os.path.join(str(manager.directory), str(step))


def _restore_newest_valid(manager, args, move_aside):
  """(step, restored tree) of the newest checkpoint that restores, or (None, None).

  A checkpoint that fails is reported and, if `move_aside`, moved out of the
  manager's directory (by process 0, then all hosts re-list), so that the
  run does not save onto or resume from it again.
  """
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=args)
    except Exception as error:  # orbax/tensorstore raise many types for missing or truncated files
      failed.append((step, step_dir(manager, step), f'{type(error).__name__}: {error}'.splitlines()[0][:300]))
      continue
    for _, path, reason in failed:
      logging.warning('Checkpoint %s is unreadable (%s); resuming from the previous valid checkpoint %s instead.',
                      path, reason, step_dir(manager, step))
    if failed and move_aside:
      _move_aside(manager, [s for s, _, _ in failed])
    return step, restored
  if failed:
    listing = '; '.join(f'{path} ({reason})' for _, path, reason in failed)
    raise RuntimeError(f'No checkpoint in {manager.directory} can be restored: {listing}. Move the directory away '
                       f'to start from scratch, or restore it from a backup.')
  return None, None


def _move_aside(manager, steps):
  workdir = os.path.dirname(str(manager.directory))
  target = os.path.join(workdir, CORRUPT_DIR)
  if jax.process_index() == 0:
    os.makedirs(target, exist_ok=True)
    for step in steps:
      destination = os.path.join(target, f'{step}-{int(time.time())}')
      shutil.move(step_dir(manager, step), destination)
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
  manager = checkpoint_manager(workdir)
  step, restored = _restore_newest_valid(manager, ocp.args.StandardRestore(), move_aside=False)
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}: train first with '
                            f'`python -m groupdiff_jax.main --mode=train --workdir={workdir} --config=...`.')
  return restored['ema_params' if use_ema else 'params'], step
