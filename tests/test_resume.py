"""Resume is bit-identical, also after a SIGTERM (preemption) or a Ctrl-C (SIGINT) mid-run.

The signals come from the run itself at a known step (train.signal_at_step), never after a wait.
"""

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import digits
from groupdiff_jax import checkpoint, errors, train
from tests import cli_in_process, digits_run

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


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """TINY trained 6 steps without a stop, saved at steps 3 and 6: (final state as numpy, workdir)."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  state = train.train_and_evaluate(tiny_config(**{'train.num_steps': 6, 'train.checkpoint_every': 3}), workdir)
  return jax.device_get(state), workdir


def test_half_run_then_resume_is_bit_identical_to_an_uninterrupted_run(trained_digits_run, uninterrupted, tmp_path):
  # The first half is the shared run (TINY trained 4 steps by the command line); this process resumes a copy.
  assert sorted(digits_run.TINY) == sorted(f'--config.{key}={value}' for key, value in TINY.items())
  whole, whole_dir = uninterrupted
  halves = trained_digits_run.copy(tmp_path / 'halves')
  resumed = train.train_and_evaluate(tiny_config(**{'train.num_steps': 6}), halves)
  assert int(resumed.step) == 6
  for field in checkpoint.SAVED_FIELDS:  # params, EMA, optimizer state, step, base key
    assert_trees_equal(getattr(whole, field), getattr(resumed, field))
  assert_trees_equal(saved(whole_dir)[1], saved(halves)[1])


def main_flags(workdir, num_steps, *flags):
  return [f'--config={ROOT}/configs/digits.py', f'--workdir={workdir}', f'--config.train.num_steps={num_steps}',
          *[f'--config.{key}={value}' for key, value in TINY.items()], *flags]


def test_sigterm_saves_the_reached_step_exits_75_and_the_checkpoint_is_exact(uninterrupted, tmp_path, capsys,
                                                                            caplog):
  # groupdiff_jax.main in this process (tests/cli_in_process.py; pytest runs tests in the main thread, where the
  # SIGTERM handler goes); train.signal_at_step: the run sends itself SIGTERM after step 3, as a scheduler would.
  workdir = str(tmp_path / 'preempted')
  caplog.set_level(logging.WARNING)
  code, _, stderr = cli_in_process.run_main(capsys, *main_flags(workdir, 100_000, '--config.train.signal_at_step=3',
                                                                '--config.train.signal_name=SIGTERM'))
  assert code == errors.EXIT_PREEMPTED, stderr[-3000:]  # saved, rerun to resume
  assert 'Preempted after step 3' in caplog.text
  reached, preempted = saved(workdir)
  assert reached == 3  # between the periodic checkpoints (every 2)
  manager = checkpoint.checkpoint_manager(uninterrupted[1], create=False)
  assert_trees_equal(jax.device_get(manager.restore(3, args=ocp.args.StandardRestore())), preempted)


def test_ctrl_c_after_the_first_step_saves_it_exits_130_and_the_rerun_resumes(tmp_path, caplog):
  # train.signal_at_step: SIGINT after step 1, as Ctrl-C would.
  workdir = str(tmp_path / 'run')
  # A fresh process: Ctrl-C's real exit status and output.
  run = subprocess.run([sys.executable, '-m', 'groupdiff_jax.main', *main_flags(workdir, 100_000,
                                                                                '--config.train.signal_at_step=1')],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == errors.EXIT_INTERRUPTED, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr and 'KeyboardInterrupt' not in run.stderr, run.stderr[-3000:]
  resume_lines = [line for line in run.stderr.splitlines() if 'rerun the same command' in line]
  assert len(resume_lines) == 1 and 'Interrupted (SIGINT) after step 1' in resume_lines[0], run.stderr[-3000:]
  assert saved(workdir)[0] == 1

  caplog.set_level(logging.INFO)
  rerun = train.train_and_evaluate(tiny_config(**{'train.num_steps': 2}), workdir)
  assert 'Resumed from step 1' in caplog.text and int(rerun.step) == 2
