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

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from groupdiff_jax import weights_io

# The TrainState fields that are saved (apply_fn and tx are code, not state).
SAVED_FIELDS = ('step', 'params', 'ema_params', 'opt_state', 'rng')
CORRUPT_DIR = 'checkpoints_corrupt'
# Params a "from pretrained" start may lack: a plain DiT/SiT has no sample embedding (GroupDiff adds it).
FRESH_IF_ABSENT = ('sample_embedder',)


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


def _flat(tree):
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
    ValueError: params missing from the checkpoint, extra there, or of
      another shape, each named by its param path (another variant,
      learn_sigma or max_group_size than the config's).
  """
  manager_dir = os.path.join(os.path.abspath(path), 'checkpoints')
  if not os.path.isdir(manager_dir):
    raise FileNotFoundError(f'train.init_from={path!r}: no checkpoint directory {manager_dir}. Pass the --output '
                            'directory of `python -m groupdiff_jax.convert` or the workdir of a training run.')
  manager = checkpoint_manager(path)
  step, restored = _restore_newest_valid(manager, ocp.args.StandardRestore(), move_aside=False)
  if step is None:
    raise FileNotFoundError(f'train.init_from={path!r}: {manager_dir} holds no checkpoint.')
  source = _flat(jax.device_get(restored['ema_params']))
  target = _flat(state.params)
  source_modules = {name.split('/')[0] for name in source}
  fresh = [name for name in target
           if name.split('/')[0] in FRESH_IF_ABSENT and name.split('/')[0] not in source_modules]
  missing = [f'{name}: expected {tuple(target[name].shape)}' for name in sorted(target)
             if name not in source and name not in fresh]
  extra = [f'{name}: {tuple(np.shape(source[name]))}' for name in sorted(source) if name not in target]
  wrong = [f'{name}: expected {tuple(target[name].shape)}, found {tuple(np.shape(source[name]))}'
           for name in sorted(target) if name in source and np.shape(source[name]) != tuple(target[name].shape)]
  if missing or extra or wrong:
    raise ValueError(weights_io.mismatch_message(
        f'train.init_from={path!r} (step {step}) does not fit the configured model (model.variant, learn_sigma, '
        'max_group_size, depth/hidden_size must be those of the checkpoint):',
        [('params missing there', missing), ('params not in this model', extra), ('wrong shapes', wrong)]))
  for name in fresh:
    logging.warning('%s is not in train.init_from=%s: it keeps its fresh initialisation.', name, path)
  logging.info('Initialised params and EMA from %s; optimizer state and step are fresh.', step_dir(manager, step))
  return state.replace(params=_place_like(source, state.params, keep=fresh),
                       ema_params=_place_like(source, state.ema_params, keep=fresh))
