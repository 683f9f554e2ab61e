"""The embedded demo end to end: data, training, checkpoints, samples, CLI."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from configs import digits
from groupdiff_jax import sharding, step_plan, train_step
from groupdiff_jax.data.digits import DigitsBatches, load_digits
from groupdiff_jax.models.dit import model_from_config
from tests import cli_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_data_and_group_batches():
  images, labels = load_digits(16)
  assert images.shape == (1797, 16, 16, 1) and images.min() >= -1 and images.max() <= 1
  config = digits.get_config()
  data_config = config.data.copy_and_resolve_references()
  data_config.batch_size = 64
  batches = DigitsBatches(data_config, seed=0)
  kinds = step_plan.step_kinds(64, 4, 0.25)
  (group_batch,) = batches.batch(5, kinds['groups'])
  assert group_batch['images'].shape == (64, 16, 16, 1)
  # Similarity groups of digits mostly share a class (neighbours by pixels).
  same = (group_batch['labels'].reshape(16, 4) == group_batch['labels'].reshape(16, 4)[:, :1]).mean()
  assert same > 0.7
  # A pure function of (seed, step).
  again = DigitsBatches(data_config, seed=0).batch(5, kinds['groups'])[0]
  np.testing.assert_array_equal(again['labels'], group_batch['labels'])


def test_a_few_demo_training_steps_lower_the_loss():
  config = digits.get_config()
  mesh = sharding.make_mesh()
  kinds = step_plan.step_kinds(64, 4, 0.25)
  model = model_from_config(config.model)
  state = train_step.create_train_state(model, config, jax.random.PRNGKey(0))
  run = train_step.make_jitted_train_step(config, mesh, sharding.replicated(mesh))
  data_config = config.data.copy_and_resolve_references()
  data_config.batch_size = 64
  batches = DigitsBatches(data_config, seed=0)
  losses = []
  for step in range(80):
    name = step_plan.step_kind_name(0, step, kinds, 0.25)
    state, metrics = run(state, batches.batch(step, kinds[name]), kinds[name])
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])


def run_main(workdir, *overrides):
  cmd = [sys.executable, '-m', 'groupdiff_jax.main', '--config=configs/digits.py', f'--workdir={workdir}',
         '--config.model.depth=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
         '--config.train.batch_size=16', '--config.train.log_every=2', '--config.train.checkpoint_every=2',
         '--config.sample.num_steps=2', '--config.sample.num_groups=2', *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_main_trains_writes_metrics_checkpoints_and_grid_then_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  first = run_main(workdir, '--config.train.num_steps=4')
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'samples.png' in first.stdout
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  grid = Image.open(os.path.join(workdir, 'samples.png'))
  assert grid.size[1] < grid.size[0] * 1.0  # 2 groups (rows) of 4 images
  second = run_main(workdir, '--config.train.num_steps=6')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resumed from step 4' in second.stderr
  assert '6' in os.listdir(os.path.join(workdir, 'checkpoints'))
  sampled = run_main(workdir, '--mode=sample', '--config.train.num_steps=6')
  assert sampled.returncode == 0 and 'checkpoint of step 6' in sampled.stdout


def test_main_rejects_data_it_has_not_and_group_sizes_that_cannot_work(tmp_path, capsys):
  # In this process (tests/cli_in_process.py); the other first-contact mistakes: tests/test_user_errors.py.
  def run(*overrides):
    return cli_in_process.run_main(capsys, f'--config={ROOT}/configs/digits.py', f'--workdir={tmp_path / "run"}',
                                   *overrides)
  code, _, stderr = run('--config.data.name=imagenet_latents')
  assert code == 2 and "config.data.name='imagenet_latents'" in stderr
  assert 'ImageNet data (latents, embeddings, neighbours)' in stderr
  for override in ('--config.train.group_size=0', '--config.train.group_size=-4'):
    code, _, stderr = run(override)
    assert code == 2 and stderr.startswith('Error: train.group_size='), (override, stderr[-2000:])
