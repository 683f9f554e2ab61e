"""launch/single_node_gpu.sh: the describe step, then training that resumes the shared trained run; its log.

The script runs as a user runs it, without JAX_PLATFORMS (JAX picks; on a
host without a TPU, groupdiff_jax.platforms skips the TPU probe), so its
output is also the check that a run's log, written to a file or a pipe, has
no carriage returns nor TPU-probe noise.
"""

import os
import subprocess
import sys

from tests import digits_run
from tests.test_resume import saved

SCRIPT = os.path.join(digits_run.ROOT, 'launch', 'single_node_gpu.sh')


def launch(*args, tmp_path, python=sys.executable):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  env.update(TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=digits_run.ROOT,
             PYTHON=python)  # this interpreter, not whatever `python` is first on PATH
  return subprocess.run(['bash', SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_describe_then_train_resuming_the_latest_checkpoint(trained_digits_run, tmp_path):
  workdir = trained_digits_run.copy(tmp_path / 'run')
  os.remove(os.path.join(workdir, 'samples.png'))
  steps = digits_run.TRAINED_STEPS + 4  # logged at 6 and 8 (log_every=2)
  result = launch('configs/digits.py', workdir, *digits_run.TINY, f'--config.train.num_steps={steps}',
                  tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.lower().index('parameters') < result.stdout.index('samples.png')  # describe came first
  assert f'Resumed from step {digits_run.TRAINED_STEPS}' in result.stderr
  assert saved(workdir)[0] == steps and os.path.exists(os.path.join(workdir, 'samples.png'))
  text = result.stdout + result.stderr  # of both processes
  assert '\r' not in text
  assert 'libtpu' not in text and "backend 'tpu'" not in text
  assert text.count('steps_per_sec=') == 2  # one per logged step
  assert 'train.batch_size = 16' in text and '[Hyperparameters]' not in text


def test_missing_argument_and_help(tmp_path):
  result = launch('configs/digits.py', tmp_path=tmp_path)
  assert result.returncode == 2
  assert 'Error: missing argument WORKDIR' in result.stderr and 'e.g.' in result.stderr
  result = launch(tmp_path=tmp_path)
  assert result.returncode == 2 and 'missing argument CONFIG and WORKDIR' in result.stderr
  result = launch('--help', tmp_path=tmp_path)
  assert result.returncode == 0 and 'Rerunning the same command resumes' in result.stdout


def test_an_interpreter_that_is_not_there_is_one_error_naming_it(tmp_path):
  missing = str(tmp_path / 'no_such_python')
  result = launch('configs/digits.py', str(tmp_path / 'run'), tmp_path=tmp_path, python=missing)
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.strip().splitlines() == [
      f'Error: PYTHON={missing} is not a command here: activate the virtualenv that has groupdiff_jax, or set '
      'PYTHON to its interpreter (e.g. PYTHON=.venv/bin/python).']
  assert not (tmp_path / 'run').exists()
