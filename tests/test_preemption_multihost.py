"""Preemption of a 2-process run: Ctrl-C (or SIGTERM) to one host; both save the same step and stop.

JAX's coordination service receives the SIGTERM and
`reached_preemption_sync_point` (via orbax's `manager.reached_preemption`)
turns True on every host at one agreed step (see preemption.py). A first
Ctrl-C is passed on to it as SIGTERM by preemption.Interrupts. The signal
comes from host 1 itself after a known step (train.signal_at_step).
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tests import cpu_devices

pytestmark = pytest.mark.long  # two processes joining a cluster: .ci/run's second step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, os.getcwd())
    workdir, address, process_id = sys.argv[1:4]
    from groupdiff_jax import distributed
    distributed.initialize(address, 2, int(process_id))
    import jax
    from configs import digits
    from groupdiff_jax import preemption, train
    config = digits.get_config()
    config.model.update(depth=1, hidden_size=32, num_heads=2, input_size=8, variant='SiT-S/2')
    config.data.update(image_size=8, grouping='class')
    config.train.update(batch_size=32, num_steps=20, log_every=1, checkpoint_every=2, group_ratio=0.5,
                        mixed_steps=True)
    if process_id == '1':
      config.train.update(signal_at_step=3, signal_name='SIGINT')  # as Ctrl-C after step 3
    config.mesh.update(data=2, fsdp=2, min_sharded_size=0)
    with preemption.Interrupts() as interrupts:  # as main.py
      state = train.train_and_evaluate(config, workdir)
    print('STOPPED AT', int(state.step), 'INTERRUPTED', interrupts.requested, flush=True)
''')


def test_ctrl_c_to_one_host_stops_every_host_at_the_same_saved_step(tmp_path):
  # Host 1's first Ctrl-C reaches the coordination service as the SIGTERM a scheduler sends (preemption.py), so
  # this also covers SIGTERM to one host; the Slurm test (test_launch_slurm.py) sends SIGTERM to both.
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  env = cpu_devices.env(2, TF_CPP_MIN_LOG_LEVEL='3')
  workdir = str(tmp_path / 'run')
  hosts = [subprocess.Popen([sys.executable, '-c', WORKER, workdir, address, str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  stopped = []
  for i, host in enumerate(hosts):
    stdout, stderr = host.communicate(timeout=600)
    assert host.returncode == 0, stderr[-3000:]
    stopped.append(int(stdout.split('STOPPED AT')[1].split()[0]))
    reason = 'Interrupted (SIGINT)' if i == 1 else 'Preempted'
    assert f'{reason} after step {stopped[-1]}' in stderr, stderr[-3000:]
    assert f'INTERRUPTED {i == 1}' in stdout  # main.py's exit 130 on that host, 75 on the other
  assert stopped[0] == stopped[1] and 3 <= stopped[0] < 20  # the agreed step, before the run's end
  assert str(stopped[0]) in os.listdir(os.path.join(workdir, 'checkpoints'))
