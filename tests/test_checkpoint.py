"""Checkpoints: atomic, pruned, and an unreadable latest one falls back to the previous valid one."""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from groupdiff_jax import checkpoint
from groupdiff_jax.train_step import TrainState


def tiny_state(step=0, value=0.0):
  params = {'dense': {'kernel': jnp.full((4, 3), value), 'bias': jnp.zeros((3,))}}
  tx = optax.adam(1e-3)
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), rng=jax.random.PRNGKey(0), apply_fn=None, tx=tx)


def save_steps(workdir, steps, max_to_keep=3):
  manager = checkpoint.checkpoint_manager(workdir, max_to_keep)
  for step in steps:
    checkpoint.save(manager, tiny_state(step, float(step)))
  manager.wait_until_finished()
  return manager


def delete_array_files(path):
  for name in glob.glob(os.path.join(path, 'default', '**', '*'), recursive=True):
    if os.path.isfile(name) and ('ocdbt' in name or '/d/' in name):
      os.remove(name)


def truncate_every_file(path):
  for name in glob.glob(os.path.join(path, 'default', '**', '*'), recursive=True):
    if os.path.isfile(name):
      open(name, 'w').close()


@pytest.mark.parametrize('corrupt', [delete_array_files, truncate_every_file])
def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog, corrupt):
  workdir = str(tmp_path)
  manager = save_steps(workdir, [2, 4])
  latest, previous = (os.path.join(workdir, 'checkpoints', s) for s in ('4', '2'))
  corrupt(latest)
  manager = checkpoint.checkpoint_manager(workdir)
  with caplog.at_level(logging.WARNING):
    state = checkpoint.restore_latest(manager, tiny_state())
  assert int(state.step) == 2
  np.testing.assert_array_equal(state.params['dense']['kernel'], np.full((4, 3), 2.0))
  assert any(latest in r.message and previous in r.message for r in caplog.records), caplog.text
  # Moved aside: the run can save step 4 again, and the next start does not warn.
  assert manager.all_steps() == [2] and os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))
  checkpoint.save(manager, tiny_state(4, 4.0))
  manager.wait_until_finished()
  assert int(checkpoint.restore_latest(checkpoint.checkpoint_manager(workdir), tiny_state()).step) == 4


def test_sampling_skips_an_unreadable_checkpoint_without_moving_it(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [2, 4])
  truncate_every_file(os.path.join(workdir, 'checkpoints', '4'))
  params, step = checkpoint.load_params(workdir, use_ema=False)
  assert step == 2 and float(np.asarray(params['dense']['kernel']).max()) == 2.0
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))


def test_no_readable_checkpoint_is_an_error_naming_the_paths(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [2])
  truncate_every_file(os.path.join(workdir, 'checkpoints', '2'))
  with pytest.raises(RuntimeError, match=os.path.join(workdir, 'checkpoints', '2')):
    checkpoint.restore_latest(checkpoint.checkpoint_manager(workdir), tiny_state())


def test_unfinished_write_is_ignored_and_old_steps_are_pruned(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [1, 2, 3, 4], max_to_keep=2)
  # What a host killed during an orbax write leaves: a temporary directory, never listed.
  os.makedirs(os.path.join(workdir, 'checkpoints', '5.orbax-checkpoint-tmp-1234', 'default'))
  manager = checkpoint.checkpoint_manager(workdir, 2)
  assert manager.all_steps() == [3, 4]
  assert int(checkpoint.restore_latest(manager, tiny_state()).step) == 4


def test_saving_a_step_twice_is_a_no_op(tmp_path):
  manager = save_steps(str(tmp_path), [2])
  assert checkpoint.save(manager, tiny_state(2, 9.0)) is False
