"""Resume is bit-identical, also after a SIGTERM (preemption) mid-run."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import digits
from groupdiff_jax import checkpoint, errors, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {'model.depth': 1, 'model.hidden_size': 32, 'model.num_heads': 2, 'train.batch_size': 16,
        'train.log_every': 2, 'train.checkpoint_every': 2, 'sample.num_steps': 2, 'sample.num_groups': 2,
        'train.mixed_steps': True}  # one step kind with groups: one compilation per run


def tiny_config(**overrides):
  config = digits.get_config()
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


def saved(workdir):
  """The newest checkpoint of workdir as numpy: {step, params, ema_params, opt_state, rng}."""
  manager = checkpoint.checkpoint_manager(workdir)
  step = manager.latest_step()
  return step, jax.device_get(manager.restore(step, args=ocp.args.StandardRestore()))


def assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_half_run_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  whole = train.train_and_evaluate(tiny_config(**{'train.num_steps': 6}), str(tmp_path / 'whole'))
  train.train_and_evaluate(tiny_config(**{'train.num_steps': 3}), str(tmp_path / 'halves'))
  resumed = train.train_and_evaluate(tiny_config(**{'train.num_steps': 6}), str(tmp_path / 'halves'))
  assert int(resumed.step) == 6
  for field in checkpoint.SAVED_FIELDS:  # params, EMA, optimizer state, step, base key
    assert_trees_equal(getattr(whole, field), getattr(resumed, field))
  assert_trees_equal(saved(str(tmp_path / 'whole'))[1], saved(str(tmp_path / 'halves'))[1])


def main_command(workdir, num_steps):
  return [sys.executable, '-m', 'groupdiff_jax.main', '--config=configs/digits.py', f'--workdir={workdir}',
          f'--config.train.num_steps={num_steps}', '--config.train.checkpoint_every=3',
          *[f'--config.{key}={value}' for key, value in TINY.items() if key != 'train.checkpoint_every']]


def test_sigterm_saves_the_reached_step_exits_cleanly_and_a_restart_is_exact(tmp_path):
  workdir = str(tmp_path / 'preempted')
  run = subprocess.Popen(main_command(workdir, 100_000), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
  deadline = time.time() + 240
  while not os.path.isdir(os.path.join(workdir, 'checkpoints', '3')):
    assert run.poll() is None and time.time() < deadline, run.communicate()[1][-3000:]
    time.sleep(0.2)
  run.send_signal(signal.SIGTERM)
  _, stderr = run.communicate(timeout=240)
  assert run.returncode == errors.EXIT_PREEMPTED, stderr[-3000:]  # saved, rerun to resume
  reached, _ = saved(workdir)
  assert reached >= 3 and f'Preempted after step {reached}' in stderr

  restart = subprocess.run(main_command(workdir, reached + 2), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert restart.returncode == 0, restart.stderr[-3000:]
  assert f'Resumed from step {reached}' in restart.stderr
  step, resumed = saved(workdir)
  assert step == reached + 2

  train.train_and_evaluate(tiny_config(**{'train.num_steps': reached + 2, 'train.checkpoint_every': 3}),
                           str(tmp_path / 'whole'))
  assert_trees_equal(saved(str(tmp_path / 'whole'))[1], resumed)
