"""launch/single_node_gpu.sh on CPU: the describe step, a short training, a rerun that resumes."""

import os
import subprocess

from tests.test_resume import saved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch', 'single_node_gpu.sh')
TINY = ['--config.model.depth=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
        '--config.train.batch_size=16', '--config.train.mixed_steps=True', '--config.train.log_every=2',
        '--config.train.checkpoint_every=2', '--config.sample.num_steps=2', '--config.sample.num_groups=2']


def launch(*args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla_cache'))
  return subprocess.run(['bash', SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_describe_train_and_resume(tmp_path):
  workdir = tmp_path / 'run'
  first = launch('configs/digits.py', str(workdir), *TINY, '--config.train.num_steps=2', tmp_path=tmp_path)
  assert first.returncode == 0, first.stderr[-4000:]
  assert 'parameters' in first.stdout.lower()  # the describe summary came first
  assert saved(str(workdir))[0] == 2 and (workdir / 'samples.png').exists()
  second = launch('configs/digits.py', str(workdir), *TINY, '--config.train.num_steps=4', tmp_path=tmp_path)
  assert second.returncode == 0, second.stderr[-4000:]
  assert 'Resumed from step 2' in second.stderr
  assert saved(str(workdir))[0] == 4


def test_missing_argument_and_help(tmp_path):
  result = launch('configs/digits.py', tmp_path=tmp_path)
  assert result.returncode == 2
  assert 'Error: missing argument WORKDIR' in result.stderr and 'e.g.' in result.stderr
  result = launch(tmp_path=tmp_path)
  assert result.returncode == 2 and 'missing argument CONFIG and WORKDIR' in result.stderr
  result = launch('--help', tmp_path=tmp_path)
  assert result.returncode == 0 and 'Rerunning the same command resumes' in result.stdout
