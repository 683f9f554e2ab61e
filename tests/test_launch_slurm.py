"""launch/slurm_gpu.sbatch on a real one-node Slurm (tests/slurm_cluster.py), 2 CPU tasks.

Marked `slurm`: .ci/run runs these in their own step (`pytest -m slurm`);
they install Slurm with apt-get where it is missing and fail, never skip,
where that is impossible. Command-line sbatch options override the
script's #SBATCH lines, so the GPU script runs 2 single-device CPU tasks
that join one JAX cluster (gloo). Reference: one process with 2 CPU devices
and the same global batch. With 2 devices every cross-device sum adds two
values, and float addition is commutative, so the two must agree bit for bit.
"""

import glob
import os
import subprocess
import sys
import time

import pytest

import jax
import orbax.checkpoint as ocp

from groupdiff_jax import checkpoint
from tests import cpu_devices, slurm_cluster
from tests.test_resume import assert_trees_equal

pytestmark = pytest.mark.slurm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch', 'slurm_gpu.sbatch')
CPU_TASKS = ['--nodes=1', '--ntasks-per-node=2', '--gpus-per-node=0', '--cpus-per-task=1']
TINY = ['--config.model.depth=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
        '--config.train.batch_size=32', '--config.train.group_ratio=0.5', '--config.data.grouping=class',
        '--config.train.mixed_steps=True', '--config.train.log_every=2', '--config.sample.num_steps=2',
        '--config.sample.num_groups=2']


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
  started = slurm_cluster.start(tmp_path_factory.mktemp('slurm'))
  try:
    yield started
  finally:
    started.stop()


def job_env(cluster, tmp_path):
  return dict(cluster.env, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT,
              PYTHON=sys.executable,  # this interpreter, not whatever `python` is first on PATH
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla_cache'))


def sbatch(cluster, tmp_path, workdir, overrides, **env):
  """Submits the launcher (job_env plus `env`); returns (Popen of `sbatch --wait --parsable`, output file)."""
  output = tmp_path / 'job.out'
  argv = ['sbatch', '--wait', '--parsable', '--open-mode=append', f'--output={output}', *CPU_TASKS, SCRIPT,
          'configs/digits.py', str(workdir), *TINY, *overrides]
  proc = subprocess.Popen(argv, cwd=ROOT, env={**job_env(cluster, tmp_path), **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  return proc, output


def saved(workdir):
  """The newest checkpoint as numpy, restored onto this process's one device whatever wrote it."""
  manager = checkpoint.checkpoint_manager(str(workdir))
  step = manager.latest_step()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  metadata = ocp.StandardCheckpointer().metadata(os.path.join(str(manager.directory), str(step), 'default'))
  metadata = getattr(metadata, 'item_metadata', metadata)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  return step, jax.device_get(manager.restore(step, args=ocp.args.StandardRestore(target)))


def job_id_of(proc):
  return proc.stdout.readline().strip().split(';')[0]


def single_process(tmp_path, workdir, overrides):
  """The same run in one process with 2 CPU devices."""
  env = dict(job_env_plain(tmp_path), XLA_FLAGS=cpu_devices.xla_flags(2))
  result = subprocess.run([sys.executable, '-m', 'groupdiff_jax.main', '--config=configs/digits.py',
                           f'--workdir={workdir}', *TINY, *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]


def job_env_plain(tmp_path):
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT,
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla_cache'))


def finish(proc, output, timeout=900):
  proc.communicate(timeout=timeout)
  return output.read_text()


def test_two_tasks_train_to_the_end_like_one_process(cluster, tmp_path):
  overrides = ['--config.train.num_steps=4', '--config.train.checkpoint_every=2']
  proc, output = sbatch(cluster, tmp_path, tmp_path / 'slurm', overrides)
  job = job_id_of(proc)
  log = finish(proc, output)
  assert proc.returncode == 0, log[-4000:]
  assert 'Process 0 of 2' in log and 'Process 1 of 2' in log and '2 global devices' in log
  assert 'groupdiff: run exited 0 (restart 0)' in log
  assert cluster.job(job)['JobState'] == 'COMPLETED'
  # Process 0 wrote the grid and the events (one events file: only process 0 writes summaries).
  assert os.path.getsize(tmp_path / 'slurm' / 'samples.png') > 0
  assert len(glob.glob(str(tmp_path / 'slurm' / 'events.out.tfevents.*'))) == 1
  single_process(tmp_path, tmp_path / 'single', overrides)
  (step_a, a), (step_b, b) = saved(str(tmp_path / 'slurm')), saved(str(tmp_path / 'single'))
  assert step_a == step_b == 4
  assert_trees_equal(a, b)


def test_requeue_stops_saves_and_resumes_bit_identically(cluster, tmp_path):
  # Many steps with a checkpoint every 2: the requeue lands long before the end (checked below).
  overrides = ['--config.train.num_steps=60', '--config.train.checkpoint_every=2']
  proc, output = sbatch(cluster, tmp_path, tmp_path / 'slurm', overrides)
  job = job_id_of(proc)
  first = tmp_path / 'slurm' / 'checkpoints' / '2'
  for _ in range(9000):  # 15 min at most
    if first.exists() or proc.poll() is not None:
      break
    time.sleep(0.1)
  assert first.exists(), output.read_text()[-4000:]
  cluster.scontrol('requeue', job)
  # Slurm holds a requeued batch job for 2 minutes (BeginTime); release it once it is pending.
  for _ in range(6000):
    if cluster.job(job)['JobState'] == 'PENDING':
      break
    time.sleep(0.1)
  cluster.scontrol('update', f'JobId={job}', 'StartTime=now')
  log = finish(proc, output, timeout=1200)
  assert proc.returncode == 0, log[-4000:]
  # Every task of the first run saved and exited 75; the second run resumed and finished.
  # srun reports both tasks on one line or one line each, depending on when they ended.
  assert ('tasks 0-1: Exited with exit code 75' in log
          or ('task 0: Exited with exit code 75' in log and 'task 1: Exited with exit code 75' in log)), log[-4000:]
  assert 'groupdiff: run exited 75 (restart 0)' in log
  assert 'groupdiff: run exited 0 (restart 1)' in log
  fields = cluster.job(job)
  assert fields['JobState'] == 'COMPLETED' and fields['Restarts'] == '1'
  single_process(tmp_path, tmp_path / 'single', overrides)
  (step_a, a), (step_b, b) = saved(str(tmp_path / 'slurm')), saved(str(tmp_path / 'single'))
  assert step_a == step_b == 60
  assert_trees_equal(a, b)


def _task_pid(job, rank):
  for environ in glob.glob('/proc/[0-9]*/environ'):
    try:
      with open(environ, 'rb') as f:
        variables = dict(v.split(b'=', 1) for v in f.read().split(b'\0') if b'=' in v)
      with open(environ.replace('environ', 'cmdline'), 'rb') as f:
        cmdline = f.read()
    except OSError:
      continue
    if (variables.get(b'SLURM_JOB_ID') == job.encode() and variables.get(b'SLURM_PROCID') == str(rank).encode()
        and b'groupdiff_jax.main' in cmdline and b'srun' not in cmdline):
      return int(os.path.basename(os.path.dirname(environ)))
  return None


def test_a_task_that_dies_at_start_fails_the_job_with_its_rank(cluster, tmp_path):
  proc, output = sbatch(cluster, tmp_path, tmp_path / 'slurm', ['--config.train.num_steps=4'])
  job = job_id_of(proc)
  pid = None
  for _ in range(3000):
    pid = _task_pid(job, 1)
    if pid or proc.poll() is not None:
      break
    time.sleep(0.1)
  assert pid, output.read_text()[-4000:]
  os.kill(pid, 9)
  log = finish(proc, output, timeout=600)  # bounded: --kill-on-bad-exit ends task 0 at once
  assert proc.returncode != 0
  assert 'task 1: Killed' in log, log[-4000:]
  assert cluster.job(job)['JobState'] == 'FAILED'
  assert not os.path.exists(tmp_path / 'slurm' / 'samples.png')


def test_an_interpreter_that_is_not_there_fails_the_job_with_one_error_naming_it(cluster, tmp_path):
  missing = str(tmp_path / 'no_such_python')
  proc, output = sbatch(cluster, tmp_path, tmp_path / 'slurm', [], PYTHON=missing)
  job = job_id_of(proc)
  log = finish(proc, output, timeout=300)
  assert proc.returncode != 0 and cluster.job(job)['JobState'] == 'FAILED'
  assert log.strip().splitlines() == [
      f'Error: PYTHON={missing} is not a command here: activate the virtualenv that has groupdiff_jax, or set '
      'PYTHON to its interpreter (e.g. PYTHON=.venv/bin/python).']
  assert not (tmp_path / 'slurm').exists()
