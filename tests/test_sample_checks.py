"""The sample job checks the checkpoint against the configured model before touching samples/, and never
writes non-finite samples."""

import os

import jax
import numpy as np
import optax
import pytest

from groupdiff_jax import checkpoint, errors, sample_job
from groupdiff_jax.train_step import TrainState
from tests import digits_run
from tests.test_sample_job import random_params, tiny_config


def save_checkpoint(workdir, params, step=1):
  tx = optax.adam(1e-3)
  state = TrainState(step=np.int32(step), params=params, ema_params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0), apply_fn=None, tx=tx)
  manager = checkpoint.checkpoint_manager(workdir)
  checkpoint.save(manager, state)
  manager.wait_until_finished()


def snapshot(directory):
  """{relative path: bytes} of every file under directory."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


@pytest.fixture(scope='module')
def depth2_workdir(tmp_path_factory):
  """A depth-2 checkpoint and the samples/ it gave."""
  workdir = str(tmp_path_factory.mktemp('depth2'))
  config = tiny_config()
  config.model.depth = 2
  save_checkpoint(workdir, random_params(config.model))
  assert sample_job.sample_and_save(config, workdir)
  return workdir


def test_a_depth_mismatch_is_one_error_naming_the_params_and_leaves_samples_untouched(depth2_workdir):
  before = snapshot(os.path.join(depth2_workdir, 'samples'))
  config = tiny_config()  # depth 1: the checkpoint's blocks_1 would be ignored by Flax
  with pytest.raises(errors.WeightsError) as raised:
    sample_job.sample_and_save(config, depth2_workdir)
  message = str(raised.value)
  assert 'blocks_1/attn/qkv/kernel' in message and 'model.depth' in message and 'params not in this model' in message
  assert snapshot(os.path.join(depth2_workdir, 'samples')) == before
  assert not [d for d in os.listdir(depth2_workdir) if d.startswith('samples_stale')]


def test_the_command_line_exits_2_naming_the_params(depth2_workdir, capsys):
  config = tiny_config()
  overrides = [f'--config.model.{k}={v}' for k, v in dict(depth=3, hidden_size=32, num_heads=2, input_size=8,
                                                          variant='SiT-S/2').items()]
  code = digits_run.run_in_process(depth2_workdir, '--mode=sample', *overrides,
                                   f'--config.sample.num_groups={config.sample.num_groups}')
  stderr = capsys.readouterr().err
  assert code == errors.EXIT_USER_ERROR, stderr[-3000:]
  assert 'blocks_2/attn/qkv/kernel' in stderr and 'model.depth' in stderr and 'Traceback' not in stderr


def test_nan_weights_stop_the_job_naming_chunk_and_group_and_write_nothing(tmp_path):
  config = tiny_config()
  params = random_params(config.model)
  params['final_layer']['linear']['kernel'][:] = np.nan
  workdir = str(tmp_path)
  with pytest.raises(errors.WeightsError, match=r'Chunk 0, group 0 .*NaN/inf'):
    sample_job.sample_and_save(config, workdir, params, step=7)
  samples = os.path.join(workdir, 'samples')
  assert not [f for f in os.listdir(samples) if f.startswith('chunk_') or f.startswith('samples_')]
  assert not os.path.exists(os.path.join(workdir, sample_job.GRID_FILE))


def test_a_checkpoint_holding_nan_is_not_sampled_from(tmp_path):
  config = tiny_config()
  params = random_params(config.model)
  params['final_layer']['linear']['kernel'][0, 0] = np.nan
  save_checkpoint(str(tmp_path), params)
  with pytest.raises(RuntimeError, match=r'final_layer/linear/kernel holds 1 non-finite'):
    checkpoint.load_params(str(tmp_path))
