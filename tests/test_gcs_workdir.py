"""A gs:// workdir end to end, against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py).

Fresh processes each: training is killed with SIGKILL after its first checkpoint object exists and resumes
bit-identically, then `--mode=sample` writes to the bucket and bit rot falls back to the previous checkpoint;
an outage during a restore or a save exits 75 and moves nothing; two processes write one checkpoint; nothing
lands on the local disk under `gs:`. Like the Slurm tests, these start a service of their own (the emulator
and its TLS proxy) and several processes: all are `long`, .ci/run's second step (`pytest -m long`).
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from groupdiff_jax import checkpoint, errors, storage, train
from tests import cpu_devices, gcs_emulator
from tests.test_resume import TINY, assert_trees_equal, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, 'tests', 'storage_runner.py')
# test_resume's tiny run with groups of the same class: storage is what is tested here, and this skips the
# neighbour search each process would otherwise run (the neighbour plan's resume: tests/test_resume.py).
GCS_TINY = {**TINY, 'data.grouping': 'class'}


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  emulator = gcs_emulator.GcsEmulator(tmp_path_factory.mktemp('gcs'))
  emulator.start()
  saved = {key: os.environ.get(key) for key in emulator.env}
  os.environ.update(emulator.env)  # this process reads the bucket too (checkpoint.load_params, the managers)
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
  yield emulator
  emulator.close()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  assert not os.path.exists(os.path.join(ROOT, 'gs:')), 'a gs:// path was written to the local disk'


def command(workdir, num_steps, *extra, mode='train'):
  return [sys.executable, RUNNER, '--config=configs/digits.py', f'--workdir={workdir}', f'--mode={mode}',
          f'--config.train.num_steps={num_steps}', *[f'--config.{key}={value}' for key, value in GCS_TINY.items()],
          *extra]


def env(gcs, **extra):
  return dict(os.environ, **gcs.env, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, **extra)


def run(gcs, args, **extra):
  done = subprocess.run(args, cwd=ROOT, env=env(gcs, **extra), capture_output=True, text=True, timeout=600)
  return done.returncode, done.stderr


def committed_steps(gcs, run_name):
  prefix = f'{run_name}/checkpoints/'
  return sorted(int(name[len(prefix):].split('/')[0]) for name in gcs.objects(prefix)
                if name.endswith('/commit_success.txt') and name.count('/') == 3)


@pytest.mark.long  # three fresh processes (start-ups, compiles): .ci/run's second step
def test_killed_run_resumes_bit_identically_and_samples_to_the_bucket(gcs, tmp_path):
  workdir = f'gs://{gcs.bucket}/run'
  # Far more steps than it reaches: SIGKILL (no handler, no save) as soon as the first checkpoint is committed.
  proc = subprocess.Popen(command(workdir, 1000), cwd=ROOT, env=env(gcs), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  while not committed_steps(gcs, 'run'):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate()
  reached = max(committed_steps(gcs, 'run'))

  code, stderr = run(gcs, command(workdir, reached + 2))
  assert code == 0, stderr[-3000:]
  assert f'Resumed from step {reached}' in stderr
  manager = checkpoint.checkpoint_manager(workdir, create=False)
  assert manager.latest_step() == reached + 2
  resumed = jax.device_get(manager.restore(reached + 2, args=ocp.args.StandardRestore()))
  train.train_and_evaluate(tiny_config(**{**GCS_TINY, 'train.num_steps': reached + 2}), str(tmp_path / 'whole'))
  whole = checkpoint.checkpoint_manager(str(tmp_path / 'whole'))
  assert_trees_equal(jax.device_get(whole.restore(reached + 2, args=ocp.args.StandardRestore())), resumed)
  assert 'run/config.json' in gcs.objects('run/')

  code, stderr = run(gcs, command(workdir, reached + 2, '--config.sample.num_groups=3', mode='sample'))
  assert code == 0, stderr[-3000:]
  objects = gcs.objects('run/')
  npz = [name for name in objects if name.startswith('run/samples/samples_') and name.endswith('.npz')]
  assert len(npz) == 1 and 'run/samples.png' in objects and 'run/samples/samples.png' in objects, sorted(objects)
  samples = storage.load_npz(f'gs://{gcs.bucket}/{npz[0]}')
  assert samples['arr_0'].dtype == np.uint8 and samples['arr_0'].shape[0] == 3 * TINY_IMAGES_PER_GROUP()
  assert gcs.read('run/samples.png')[:8] == b'\x89PNG\r\n\x1a\n'

  flip_newest_and_check_the_previous_is_loaded(gcs, workdir, 'run')
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))


def flip_newest_and_check_the_previous_is_loaded(gcs, workdir, run_name):
  """Bit rot: three bytes of the newest checkpoint's largest array object flipped. Detected; the previous is used."""
  steps = committed_steps(gcs, run_name)
  newest = steps[-1]
  arrays = {name: size for name, size in gcs.objects(f'{run_name}/checkpoints/{newest}/').items() if '/d/' in name}
  largest = max(arrays, key=arrays.get)
  data = bytearray(gcs.read(largest))
  for offset in (len(data) // 4, len(data) // 2, 3 * len(data) // 4):
    data[offset] ^= 0xFF
  gcs.write(largest, bytes(data))
  _, step = checkpoint.load_params(workdir)
  assert step == steps[-2]


def TINY_IMAGES_PER_GROUP():  # pylint: disable=invalid-name
  return tiny_config().sample.images_per_group


@pytest.mark.long  # four fresh processes: .ci/run's second step
def test_an_outage_during_restore_or_save_exits_75_and_moves_no_checkpoint(gcs):
  workdir = f'gs://{gcs.bucket}/outage'
  code, stderr = run(gcs, command(workdir, 2))
  assert code == 0, stderr[-3000:]
  assert committed_steps(gcs, 'outage') == [2]

  for stop_at in ('restore', 'save:4'):
    try:
      code, stderr = run(gcs, command(workdir, 4), STOP_EMULATOR_PID=str(gcs.process.pid), STOP_EMULATOR_AT=stop_at)
    finally:
      stopped = gcs.process.pid
      gcs.start()  # storage is back (also for the next tests when an assertion fails)
    assert code == errors.EXIT_PREEMPTED, stderr[-3000:]
    assert f'emulator {stopped} stopped' in stderr, stderr[-3000:]
    if stop_at == 'restore':  # backed off, then gave up (a background write: the clients' own retries)
      assert stderr.count('storage wait') >= storage.RETRIES, stderr[-3000:]
    message = [line for line in stderr.splitlines() if line.startswith('Error: ')]
    assert len(message) == 1 and message[0].startswith('Error: Storage at gs://bucket/outage'), stderr[-3000:]
    assert 'is unreachable' in message[0] and 'rerun the same command' in message[0]
    # The message is last but for clu's background TensorBoard writer, whose thread may log after it.
    after = [line for line in stderr.split(message[0], 1)[1].splitlines() if line.strip()]
    assert not after or 'asynclib.py' in after[0], stderr[-3000:]
    # No traceback of this code's; clu's background TensorBoard writer logs the events it could not flush.
    assert all('clu/asynclib.py' in chunk.split('\n', 3)[1] + chunk.split('\n', 3)[2]
               for chunk in stderr.split('Traceback (most recent call last):')[1:]), stderr[-3000:]
    assert committed_steps(gcs, 'outage') == [2], stop_at  # the good checkpoint stayed where it was
    assert not gcs.objects('outage/checkpoints_corrupt/'), stop_at

  code, stderr = run(gcs, command(workdir, 4))
  assert code == 0, stderr[-3000:]
  assert 'Resumed from step 2' in stderr
  assert committed_steps(gcs, 'outage') == [2, 4]


@pytest.mark.long  # two processes joining a cluster: .ci/run's second step
def test_two_processes_on_one_bucket_workdir_write_one_checkpoint(gcs):
  from tests.test_checkpoint_multihost import WORKER  # pylint: disable=g-import-not-at-top
  from tests.test_multihost import free_port  # pylint: disable=g-import-not-at-top
  address = f'127.0.0.1:{free_port()}'
  environment = env(gcs, XLA_FLAGS=cpu_devices.xla_flags(2), TF_CPP_MIN_LOG_LEVEL='3')
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, f'gs://{gcs.bucket}/multi', address, str(i), 'none'],
                            cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    assert '"step": 4' in stdout and '"kernel_value": 4.0' in stdout, stdout[-2000:]
  objects = gcs.objects('multi/')
  assert committed_steps(gcs, 'multi') == [2, 4]
  # One checkpoint per step, holding both processes' shards (one OCDBT tree each), one metadata file.
  for step in (2, 4):
    assert sum(name == f'multi/checkpoints/{step}/_CHECKPOINT_METADATA' for name in objects) == 1
    assert {name.split('/')[4] for name in objects if '/ocdbt.process_' in name and f'/{step}/' in name} == {
        'ocdbt.process_0', 'ocdbt.process_1'}
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
