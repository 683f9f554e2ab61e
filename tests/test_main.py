"""The embedded demo end to end: data, training, checkpoints, samples, CLI."""

import glob
import os

import numpy as np
from PIL import Image

from configs import digits
from groupdiff_jax import errors, step_plan
from groupdiff_jax.data.digits import DigitsBatches, load_digits
from tests import digits_run


def test_digits_data_and_group_batches():
  images, labels = load_digits(16)
  assert images.shape == (1797, 16, 16, 1) and images.min() >= -1 and images.max() <= 1
  config = digits.get_config()
  config.train.batch_size = 64
  batches = DigitsBatches(config, seed=0)
  kinds = step_plan.step_kinds(64, 4, 0.25, mixed_steps=False)
  (group_batch,) = batches.batch(5, kinds['groups'])
  assert group_batch['images'].shape == (64, 16, 16, 1)
  # Similarity groups of digits mostly share a class (neighbours by pixels).
  same = (group_batch['labels'].reshape(16, 4) == group_batch['labels'].reshape(16, 4)[:, :1]).mean()
  assert same > 0.7
  # A pure function of (seed, step).
  again = DigitsBatches(config, seed=0).batch(5, kinds['groups'])[0]
  np.testing.assert_array_equal(again['labels'], group_batch['labels'])


def test_main_trains_writes_metrics_checkpoints_and_the_grid(trained_digits_run):
  workdir = trained_digits_run.workdir
  assert 'samples.png' in trained_digits_run.stdout
  assert glob.glob(str(workdir / 'events.out.tfevents.*'))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']  # checkpoint_every=2 of 4 steps
  grid = Image.open(workdir / 'samples.png')
  assert grid.size[1] < grid.size[0]  # 2 groups (rows) of 4 images


def test_sample_mode_samples_the_latest_checkpoint_one_class_per_group(trained_digits_run, tmp_path, capsys, caplog):
  workdir = trained_digits_run.copy(tmp_path / 'run')
  assert digits_run.run_in_process(workdir, *digits_run.TINY, '--mode=sample') == 0
  assert 'checkpoint of step 4' in caplog.text  # logged
  assert 'Sample grid (each row one jointly generated group)' in capsys.readouterr().out  # the final output
  (path,) = glob.glob(os.path.join(workdir, 'samples', 'samples_*.npz'))
  with np.load(path) as samples:
    assert samples['arr_0'].shape == (8, 16, 16, 3) and samples['arr_0'].dtype == np.uint8  # the ADM layout
    np.testing.assert_array_equal(samples['labels'], [0, 0, 0, 0, 1, 1, 1, 1])  # group g is class g


def test_main_rejects_unknown_config_keys_and_data(tmp_path, capsys):
  def rejected(*overrides):
    code = digits_run.run_in_process(str(tmp_path / 'run'), *digits_run.TINY, '--config.train.num_steps=1',
                                     *overrides)
    stderr = capsys.readouterr().err
    assert code == errors.EXIT_USER_ERROR, (overrides, stderr[-2000:])
    assert 'Traceback' not in stderr
    return stderr

  assert 'num_stepz' in rejected('--config.train.num_stepz=3')
  bad_data = rejected('--config.data.name=imagenet_latents')
  assert "config.data.name='imagenet_latents'" in bad_data and 'ImageNet data (latents, embeddings, neighbours)' in bad_data
  for override in ('--config.train.batch_size=18', '--config.train.group_size=0', '--config.train.group_size=-4'):
    assert rejected(override).rstrip().splitlines()[-1].startswith('Error: train.'), override
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
