"""A one-node Slurm with munge for tests: installs it if needed, starts it, stops it.

`start(directory)` writes a slurm.conf for this host (CPUs=2, cons_tres,
proctrack/linuxproc, every state, spool, log and socket file under
`directory`), starts `munged --force`, `slurmctld` and `slurmd` as root, and
returns a SlurmCluster whose `env` points the clients (sbatch, scontrol) at
it. `stop()` ends exactly the daemons it started, by PID, and waits for them.
Installing needs root and Debian's packages (`apt-get install slurm-wlm
munge`); where that fails, `start` raises (the test fails, never skips).
"""

import os
import shutil
import signal
import socket
import subprocess
import time

PACKAGES = ('slurm-wlm', 'munge')


def install():
  """apt-get installs Slurm and munge unless slurmctld, slurmd, sbatch and munged are on PATH."""
  if all(shutil.which(b) or os.path.exists(f'/usr/sbin/{b}') for b in ('slurmctld', 'slurmd', 'sbatch', 'munged')):
    return
  env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
  subprocess.run(['apt-get', 'update', '-qq'], check=True, env=env, timeout=600)
  subprocess.run(['apt-get', 'install', '-y', '-qq', *PACKAGES], check=True, env=env, timeout=900)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _config(directory, host, ctld_port, slurmd_port, munge_socket):
  d = directory
  return f'''ClusterName=groupdiff-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
KillWait=60
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
'''


class SlurmCluster:

  def __init__(self, directory):
    self.directory = str(directory)
    self.host = socket.gethostname().split('.')[0]
    self.env = dict(os.environ, SLURM_CONF=os.path.join(self.directory, 'slurm.conf'))
    self.processes = []  # (name, Popen) of every daemon started here

  def _daemon(self, name, argv):
    log = open(os.path.join(self.directory, f'{name}.stdout'), 'w')
    self.processes.append((name, subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)))

  def start(self):
    d = self.directory
    for sub in ('state', 'spool', 'munge'):
      os.makedirs(os.path.join(d, sub), exist_ok=True)
    munge_socket = os.path.join(d, 'munge', 'munge.socket')
    key = os.path.join(d, 'munge', 'munge.key')
    if os.path.exists('/etc/munge/munge.key'):
      shutil.copyfile('/etc/munge/munge.key', key)
    else:
      with open(key, 'wb') as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    with open(os.path.join(d, 'slurm.conf'), 'w') as f:
      f.write(_config(d, self.host, _free_port(), _free_port(), munge_socket))
    # Foreground daemons (-F / -D): Popen's PID is the daemon's, so stop() ends exactly them.
    self._daemon('munged', ['munged', '--foreground', '--force', f'--socket={munge_socket}', f'--key-file={key}',
                            f'--pid-file={d}/munge/munged.pid', f'--log-file={d}/munge/munged.log',
                            f'--seed-file={d}/munge/munged.seed'])
    self._wait(lambda: os.path.exists(munge_socket), 'munged socket')
    self._daemon('slurmctld', ['slurmctld', '-D', '-i', '-f', self.env['SLURM_CONF']])
    self._wait(lambda: self.scontrol('ping', check=False).returncode == 0, 'slurmctld ping')
    self._daemon('slurmd', ['slurmd', '-D', '-f', self.env['SLURM_CONF'], '-N', self.host])
    self._wait(lambda: self.node_state().split('+')[0].split('*')[0] in ('IDLE', 'MIXED', 'ALLOCATED'), 'node idle')
    return self

  def _wait(self, ready, what, attempts=600):
    """Polls `ready` every 0.1 s; raises (with the logs) if a daemon died or it never became ready."""
    for _ in range(attempts):
      for name, proc in self.processes:
        if proc.poll() is not None:
          raise RuntimeError(f'{name} exited with {proc.returncode} while waiting for {what}:\n{self.logs()}')
      if ready():
        return
      time.sleep(0.1)
    raise RuntimeError(f'Slurm: no {what} after {attempts / 10:.0f} s:\n{self.logs()}')

  def logs(self):
    text = []
    for name in ('slurmctld.log', 'slurmd.log', 'munge/munged.log', 'munged.stdout', 'slurmctld.stdout',
                 'slurmd.stdout'):
      path = os.path.join(self.directory, name)
      if os.path.exists(path):
        with open(path) as f:
          text.append(f'--- {name}\n' + f.read()[-3000:])
    return '\n'.join(text)

  def scontrol(self, *args, check=True):
    return subprocess.run(['scontrol', *args], env=self.env, capture_output=True, text=True, check=check, timeout=60)

  def node_state(self):
    result = self.scontrol('show', 'node', self.host, '-o', check=False)
    for field in result.stdout.split():
      if field.startswith('State='):
        return field[len('State='):]
    return ''

  def job(self, job_id):
    """`scontrol show job` as a dict of its Key=Value fields."""
    out = self.scontrol('show', 'job', str(job_id), '-o').stdout
    return dict(field.split('=', 1) for field in out.split() if '=' in field)

  def stop(self):
    """SIGTERM then SIGKILL to every daemon started here (slurmd first), by PID."""
    for name, proc in reversed(self.processes):
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
          proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait(timeout=30)
    self.processes = []


def start(directory):
  install()
  cluster = SlurmCluster(directory)
  try:
    return cluster.start()
  except BaseException:
    cluster.stop()
    raise
