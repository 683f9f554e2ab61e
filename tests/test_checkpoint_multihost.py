"""Checkpoint verification on 2 hosts: a bad shard only one host holds makes both fall back, together.

Two local CPU processes x 2 devices join through `jax.distributed` (gloo).
A kernel [8, 4] is split over the 4 devices by rows, so process 1 alone
holds rows 4:8. Both save steps 2 and 4; then step 4 is spoiled where only
process 1 can see it: its checksum of shard '6:8,0:4' in the metadata
(bit rot) or a NaN saved in row 6. Both processes must restore step 2 (no
deadlock, no host resuming from a checkpoint the other refused), and step
4 must be moved aside once.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from groupdiff_jax import checkpoint
from tests import cpu_devices
from tests.test_multihost import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.long  # two processes joining a cluster: .ci/run's second step

WORKER = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, os.getcwd())
    workdir, address, process_id, spoil = sys.argv[1:5]
    from groupdiff_jax import distributed
    distributed.initialize(address, 2, int(process_id))
    import jax, numpy as np, optax
    from groupdiff_jax.train_step import TrainState
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from groupdiff_jax import checkpoint
    mesh = Mesh(np.asarray(jax.devices()).reshape(4), ('rows',))
    rows = NamedSharding(mesh, P('rows', None))

    def replicated(value):  # a global array: the same value on every device of both processes
      value = np.asarray(value)
      return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P()), lambda index: value[index])

    def state(step, nan_row=None):
      kernel = np.full((8, 4), float(step), np.float32)
      if nan_row is not None:
        kernel[nan_row, 0] = np.nan
      params = {'kernel': jax.make_array_from_callback((8, 4), rows, lambda index: kernel[index])}
      tx = optax.sgd(0.1)
      return TrainState(step=replicated(np.int32(step)), params=params, ema_params=params,
                        opt_state=tx.init(params), rng=replicated(jax.random.PRNGKey(0)), apply_fn=None, tx=tx)

    manager = checkpoint.checkpoint_manager(workdir)
    checkpoint.save(manager, state(2))
    checkpoint.save(manager, state(4, nan_row=6 if spoil == 'nan' else None))
    manager.wait_until_finished()
    if spoil == 'checksum' and jax.process_index() == 0:
      path = os.path.join(workdir, 'checkpoints', '4', '_CHECKPOINT_METADATA')
      metadata = json.load(open(path))
      metadata['custom_metadata']['checksums']['params/kernel']['6:8,0:4'] ^= 1
      json.dump(metadata, open(path, 'w'))
    multihost_utils.sync_global_devices('spoiled')
    restored = checkpoint.restore_latest(checkpoint.checkpoint_manager(workdir), state(0))
    kernel = multihost_utils.process_allgather(restored.params['kernel'], tiled=True)
    print('RESULT', json.dumps({'step': int(restored.step), 'kernel_value': float(np.asarray(kernel)[0, 0])}),
          flush=True)
''')


@pytest.mark.parametrize('spoil', ['checksum', 'nan'])
def test_a_shard_only_one_host_holds_makes_every_host_fall_back(tmp_path, spoil):
  address = f'127.0.0.1:{free_port()}'
  env = cpu_devices.env(2, TF_CPP_MIN_LOG_LEVEL='3')
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, str(tmp_path), address, str(i), spoil], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    results.append((json.loads(stdout.split('RESULT', 1)[1]), stderr))
  for result, _ in results:
    assert result == {'step': 2, 'kernel_value': 2.0}
  # Process 1 names the shard it found bad; process 0 says another host found it.
  assert '6:8,0:4' in results[1][1] and 'another host' in results[0][1]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  assert len(os.listdir(tmp_path / checkpoint.CORRUPT_DIR)) == 1
