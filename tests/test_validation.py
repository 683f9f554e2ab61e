"""Bad inputs fail before any compute, each naming the value or path and what to do."""

import os
import types

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import digits
from groupdiff_jax import errors, sharding, step_plan, validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_mesh(devices):
  """What the checks read of a mesh: its axis sizes (data axis = `devices`)."""
  return types.SimpleNamespace(shape={'data': devices, 'fsdp': 1})


def config_with(**train):
  config = digits.get_config()
  for name, value in train.items():
    config.train[name] = value
  return config


def test_a_good_config_passes_and_gives_the_step_kinds(tmp_path):
  # 64 images at 25%: 48 singles and 4 groups of 4 per step, whole groups on each of 4 devices
  kinds = validation.check_before_training(config_with(batch_size=64), str(tmp_path / 'run'), fake_mesh(4))
  assert set(kinds) == {'mixed'} and os.path.isdir(tmp_path / 'run')  # the default (official) composition


def test_batch_not_divisible_by_group_size(tmp_path):
  with pytest.raises(ValueError, match=r'train.batch_size=18 is not whole groups of train.group_size=4; the nearest '
                                       r'batch sizes that are: 16 and 20\.'):
    validation.check_before_training(config_with(batch_size=18), str(tmp_path), fake_mesh(1))


def test_groups_not_divisible_over_devices_and_hosts(tmp_path):
  # 8 images = 2 groups of 4: cannot go to 4 devices (or 4 hosts of one device) without splitting a group.
  with pytest.raises(ValueError, match=r'2 groups of 4 images .* 4 data x fsdp shards .* multiple of 16 images'):
    validation.check_before_training(config_with(batch_size=8, mixed_steps=False), str(tmp_path), fake_mesh(4))


def test_mesh_does_not_match_the_device_count():
  with pytest.raises(ValueError, match=r'mesh.data=3 x mesh.fsdp=1 x mesh.group=1 does not divide the 8 devices'):
    sharding.mesh_shape(8, data=3, fsdp=1)


def test_group_size_larger_than_the_sample_embedding(tmp_path):
  with pytest.raises(ValueError, match=r'train.group_size=8 exceeds model.max_group_size=4'):
    validation.check_before_training(config_with(group_size=8), str(tmp_path), fake_mesh(1))


def test_workdir_not_writable(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(PermissionError, match=f'--workdir={blocker}/run is not a writable directory'):
    validation.check_before_training(config_with(), str(blocker / 'run'), fake_mesh(1))


def test_unknown_config_key_on_the_command_line():
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values, lock_config=True)
  with pytest.raises(flags.UnrecognizedFlagError, match='config.train.num_stepz'):
    flag_values(['main', f'--config={ROOT}/configs/digits.py', '--config.train.num_stepz=3'])


@pytest.mark.parametrize('group_size', [0, -4])
def test_nonpositive_group_size_is_a_config_error(group_size):
  with pytest.raises(errors.ConfigError, match=f'train.group_size={group_size} must be a positive integer'):
    step_plan.step_kinds(16, group_size, 0.5)


def test_nonpositive_batch_size_is_a_config_error():
  with pytest.raises(errors.ConfigError, match='train.batch_size=0 must be a positive integer'):
    step_plan.step_kinds(0, 4, 0.5)


def test_indivisible_batch_is_a_user_error():
  with pytest.raises(errors.UserError, match='batch_size=18 is not whole groups of train.group_size=4'):
    step_plan.step_kinds(18, 4, 0.5)
  with pytest.raises(errors.UserError, match='nearest batch sizes that are: 4.$'):  # none below
    step_plan.step_kinds(3, 4, 0.5)
  with pytest.raises(errors.UserError, match='nearest batch sizes that are: 16 and 20.$'):  # GroupDiff-f
    step_plan.step_kinds(18, 4, 0.0, mode='groupdiff_f')


def test_group_size_above_the_in_memory_neighbour_lists_is_refused():
  from groupdiff_jax.data import array_batches
  neighbors = np.zeros((10, 3), np.int32)
  with pytest.raises(errors.ConfigError, match='group_size=5 needs 4 neighbours.*K=3'):
    array_batches.ArrayBatches(np.zeros((10, 2, 2, 1)), np.zeros(10, np.int32), 'official_plan', 8, 0, neighbors, 5)
  array_batches.ArrayBatches(np.zeros((10, 2, 2, 1)), np.zeros(10, np.int32), 'official_plan', 8, 0, neighbors, 4)
