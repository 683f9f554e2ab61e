"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Call `initialize()` once, before anything touches a device. Then
`jax.devices()` lists every device of every process, the mesh spans them
all (sharding.make_mesh), each process feeds only its own groups
(train.host_batch) and orbax writes checkpoints cooperatively.

Where the cluster comes from, in order:
  1. explicit arguments (`--coordinator_address`, `--num_processes`,
     `--process_id`: local multi-process tests, any hand-made cluster);
  2. the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
     JAX_PROCESS_ID (what launch/ scripts export on plain multi-node GPU);
  3. a cluster JAX detects by itself: a Cloud TPU pod slice (TPU VM
     metadata), Slurm (more than one task), Open MPI; we then call
     `jax.distributed.initialize()` with no arguments. JAX_DISTRIBUTED_AUTO=1
     forces that call (launch/tpu_pod.sh sets it: not every TPU VM image
     exports TPU_WORKER_HOSTNAMES).
  4. otherwise one process: nothing to do.
"""

import logging as python_logging
import os

import jax
from absl import logging

from groupdiff_jax import errors

ENV_ADDRESS = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


# Library code logs INFO on process 0 only (warnings and errors on every process), once `initialize` knows
# the rank; a line every process should log passes `extra=ALL_PROCESSES` (logging.info(..., extra=...)).
ALL_PROCESSES = {'all_processes': True}
_process_index = 0  # this process's rank as `initialize` found it


ENV_AUTO = 'JAX_DISTRIBUTED_AUTO'  # '1': call jax.distributed.initialize() and let JAX find the cluster
ENV_TIMEOUT = 'JAX_INITIALIZATION_TIMEOUT'  # seconds every process waits for all to join (default 300)


def _join(what, **kwargs):
  """jax.distributed.initialize, bounded by ENV_TIMEOUT; a failure names this process."""
  timeout = int(os.environ.get(ENV_TIMEOUT, '300'))
  rank = kwargs.get('process_id', os.environ.get('SLURM_PROCID', os.environ.get('OMPI_COMM_WORLD_RANK', '?')))
  # JAX aborts the process (no Python exception) when the deadline passes: this line names it first.
  logging.info('Process %s joining the %s cluster (%s: waits up to %d s for every process).', rank, what,
               kwargs.get('coordinator_address') or 'address from the environment', timeout)
  try:
    jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
  except Exception as error:  # pylint: disable=broad-except
    raise RuntimeError(f'Process {rank} could not join the {what} cluster within {timeout} s '
                       f'({ENV_TIMEOUT}); did every process start? {error}') from error


def _detected_cluster():
  """The name of an auto-detectable multi-process environment, or None."""
  if os.environ.get(ENV_AUTO) == '1':
    return 'environment (JAX_DISTRIBUTED_AUTO=1)'
  if int(os.environ.get('SLURM_NTASKS', os.environ.get('SLURM_NPROCS', '1'))) > 1:
    return 'slurm'
  if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'openmpi'
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1:
    return 'tpu_pod'
  if os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu_multislice'
  return None


def initialize(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None):
  """Join the cluster, if there is one. Returns (process_index, process_count).

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes, process_id: this cluster's size and this process's rank.
    local_device_ids: devices this process uses (e.g. one GPU per process).
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_ADDRESS)
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise errors.ConfigError(f'--coordinator_address={coordinator_address} needs --num_processes and --process_id '
                               f'(or {ENV_NUM_PROCESSES}/{ENV_PROCESS_ID} in the environment).')
    if os.environ.get('JAX_PLATFORMS', '').split(',')[0] == 'cpu':
      # CPU collectives across processes (tests, CPU clusters). Asking
      # jax.default_backend() here would start the backend too early.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    _join(f'{num_processes}-process', coordinator_address=coordinator_address, num_processes=num_processes,
          process_id=process_id, local_device_ids=local_device_ids)
  else:
    cluster = _detected_cluster()
    if cluster is None:
      return 0, 1
    logging.info('Joining the %s cluster (auto-detected).', cluster)
    _join(cluster, local_device_ids=local_device_ids)
  logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), extra=ALL_PROCESSES)
  log_on_process_zero(jax.process_index())
  return jax.process_index(), jax.process_count()


class _ProcessZeroOnly(python_logging.Filter):
  """Lets warnings and errors through, and INFO/DEBUG lines marked ALL_PROCESSES."""

  def filter(self, record):
    return record.levelno >= python_logging.WARNING or getattr(record, 'all_processes', False)


def log_on_process_zero(process_index):
  """From now on absl's INFO lines (the library's) appear on process 0 only, unless marked ALL_PROCESSES."""
  global _process_index
  _process_index = process_index
  absl_logger = logging.get_absl_logger()
  for old in [f for f in absl_logger.filters if isinstance(f, _ProcessZeroOnly)]:
    absl_logger.removeFilter(old)
  if process_index != 0:
    absl_logger.addFilter(_ProcessZeroOnly())


def process_index():
  """This process's rank as `initialize` found it (0 before, or without a cluster); unlike
  jax.process_index() it starts no backend."""
  return _process_index


def is_main_process():
  """True on the process that writes logs, summaries and sample grids."""
  return jax.process_index() == 0
