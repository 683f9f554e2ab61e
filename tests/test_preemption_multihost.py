"""Preemption of a 2-process run: SIGTERM to one host, both save the same step and exit cleanly.

JAX's coordination service receives the SIGTERM and
`reached_preemption_sync_point` (via orbax's `manager.reached_preemption`)
turns True on every host at one agreed step (see preemption.py).
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, os.getcwd())
    workdir, address, process_id = sys.argv[1:4]
    from groupdiff_jax import distributed
    distributed.initialize(address, 2, int(process_id))
    import jax
    from configs import digits
    from groupdiff_jax import train
    config = digits.get_config()
    config.model.update(depth=1, hidden_size=32, num_heads=2, input_size=8, variant='SiT-S/2')
    config.data.update(image_size=8, grouping='class')
    config.train.update(batch_size=32, num_steps=100_000, log_every=1, checkpoint_every=3, group_ratio=0.5,
                        mixed_steps=True)
    config.mesh.update(data=2, fsdp=2, min_sharded_size=0)
    state = train.train_and_evaluate(config, workdir)
    print('STOPPED AT', int(state.step), flush=True)
''')


def test_sigterm_to_one_host_stops_every_host_at_the_same_saved_step(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='3')
  workdir = str(tmp_path / 'run')
  hosts = [subprocess.Popen([sys.executable, '-c', WORKER, workdir, address, str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  deadline = time.time() + 400
  while not os.path.isdir(os.path.join(workdir, 'checkpoints', '3')):
    assert all(h.poll() is None for h in hosts) and time.time() < deadline, hosts[0].communicate()[1][-3000:]
    time.sleep(0.2)
  hosts[1].send_signal(signal.SIGTERM)
  stopped = []
  for host in hosts:
    stdout, stderr = host.communicate(timeout=300)
    assert host.returncode == 0, stderr[-3000:]
    stopped.append(int(stdout.split('STOPPED AT')[1].split()[0]))
    assert f'Preempted after step {stopped[-1]}' in stderr
  assert stopped[0] == stopped[1] >= 3
  assert str(stopped[0]) in os.listdir(os.path.join(workdir, 'checkpoints'))
