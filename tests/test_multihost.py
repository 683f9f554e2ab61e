"""Multi-host training: 2 local CPU processes x 2 devices == 1 process x 4 devices.

The processes join through `jax.distributed` on 127.0.0.1 (gloo CPU
collectives); each feeds only its own rows (whole groups) of every batch.
A couple of digits-demo steps (tiny model, params sharded over fsdp and data) must
give the parameters a single process with 4 devices gets, and both
processes must write the checkpoint together.
"""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests import cpu_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, os.getcwd())
    out, workdir, address, num_processes, process_id = sys.argv[1:6]
    from groupdiff_jax import distributed
    if address != 'none':
      distributed.initialize(address, int(num_processes), int(process_id))
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from configs import digits
    from groupdiff_jax import train
    assert jax.device_count() == 4, jax.devices()
    config = digits.get_config()
    config.model.update(depth=1, hidden_size=32, num_heads=2, input_size=8, variant='SiT-S/2')
    config.data.image_size = 8
    config.data.grouping = 'class'  # no ScaNN index: keeps the test fast
    # Mixed steps (16 singles + 4 groups of 4 each): one compiled kind, whole groups on every device.
    config.train.update(batch_size=32, num_steps=2, log_every=1, checkpoint_every=2, group_ratio=0.5,
                        mixed_steps=True)
    config.mesh.update(data=2, fsdp=2, min_sharded_size=0)
    state = train.train_and_evaluate(config, workdir)
    spec = state.params['blocks_0']['attn']['qkv']['kernel'].sharding.spec
    # The default sharded update (mesh.shard_update) splits the float32 params over fsdp and then data.
    assert spec == jax.sharding.PartitionSpec(None, ('fsdp', 'data')), spec
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
      flat = {'/'.join(str(k.key) for k in path): np.asarray(v)
              for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
      np.savez(out, **flat)
    print('DONE', jax.process_index(), flush=True)
''')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(devices, *args):
  env = cpu_devices.env(devices, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen([sys.executable, '-c', WORKER, *map(str, args)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.long
def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path):
  address = f'127.0.0.1:{free_port()}'
  multi = [launch(2, tmp_path / 'multi.npz', tmp_path / 'multi', address, 2, i) for i in range(2)]
  single = launch(4, tmp_path / 'single.npz', tmp_path / 'single', 'none', 1, 0)
  for proc in multi + [single]:
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-4000:]
    assert 'DONE' in stdout
  a, b = np.load(tmp_path / 'multi.npz'), np.load(tmp_path / 'single.npz')
  assert sorted(a.files) == sorted(b.files) and 'blocks_0/attn/qkv/kernel' in a.files
  for name in a.files:
    np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # Both processes wrote one checkpoint together; the step is the last one.
  assert sorted(os.listdir(tmp_path / 'multi' / 'checkpoints')) == ['2']


def test_cluster_detection_from_the_environment(monkeypatch):
  from groupdiff_jax import distributed
  for name in ('SLURM_NTASKS', 'SLURM_NPROCS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
               'MEGASCALE_COORDINATOR_ADDRESS', distributed.ENV_AUTO, distributed.ENV_ADDRESS):
    monkeypatch.delenv(name, raising=False)
  assert distributed._detected_cluster() is None
  assert distributed.initialize() == (0, 1)  # one process: nothing to join
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed._detected_cluster() is None  # a one-task Slurm job is one process
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert distributed._detected_cluster() == 'slurm'
  monkeypatch.delenv('SLURM_NTASKS')
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')
  assert distributed._detected_cluster() == 'tpu_pod'
  monkeypatch.setenv(distributed.ENV_ADDRESS, '10.0.0.1:1234')
  with pytest.raises(ValueError, match='num_processes'):
    distributed.initialize()
