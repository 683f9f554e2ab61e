"""Orbax checkpoints of the train state in `<workdir>/checkpoints`."""

import os

import jax
import orbax.checkpoint as ocp

# The TrainState fields that are saved (apply_fn and tx are code, not state).
SAVED_FIELDS = ('step', 'params', 'ema_params', 'opt_state', 'rng')


def checkpoint_manager(workdir, max_to_keep=3):
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory, options=options)


def _saved_tree(state):
  return {name: getattr(state, name) for name in SAVED_FIELDS}


def save(manager, state):
  """Save `state` under its step (asynchronously; `wait` before exiting)."""
  manager.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(_saved_tree(state)))


def restore_latest(manager, state):
  """The latest checkpoint restored into `state`'s structure and shardings.

  Returns `state` itself when there is no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved_tree(state))
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return state.replace(**restored)


def load_params(workdir, use_ema=True):
  """Model parameters of the latest checkpoint in workdir (for sampling)."""
  manager = checkpoint_manager(workdir)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}: train first with '
                            f'`python -m groupdiff_jax.main --mode=train --workdir={workdir} --config=...`.')
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  return restored['ema_params' if use_ema else 'params'], step
