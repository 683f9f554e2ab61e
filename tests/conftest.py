"""Test setup: repo root importable (for configs/), JAX on CPU, what the tests of one run share."""

import fcntl
import os
import sys

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Compile tests in parallel workers each load libtpu (no TPU is used); without this the second one is refused.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# XLA compiles without LLVM's optimisation passes (backend optimisation level 0), here and in the tests'
# subprocesses: the suite's time is mostly compiling tiny programs that then run once or a few times, and level 0
# compiles them in about half the time. The HLO (fusion, layout, sharding) is the same; the machine code is not,
# so results may differ from an optimised build in the last bits, as between any two CPUs: no test compares with
# numbers from outside the run. TPU-topology compiles (tests/test_compile_job.py) keep the full optimisation.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# XLA:CPU's MLIR fusion emitters build every fusion in an MLIR context of its own; the LLVM IR emitters they
# replace compile this suite's small programs much faster (the mixed train step of tests/test_sharding.py: 6.1 s
# -> 1.6 s on one core; worker-seconds of the suite 589 -> ~510). Same HLO, other machine code: the note above
# applies.
CPU_COMPILE_FLAGS = '--xla_cpu_use_fusion_emitters=false'
if CPU_COMPILE_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_COMPILE_FLAGS}".strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The files that take the longest (worker-seconds, slowest first; README "Tests"). `--dist loadfile` hands out
# whole files in collection order, so these start first and the workers end together on the short ones.
SLOW_FILES = ('test_fashion_table1_smoke.py', 'test_sharding.py', 'test_gcs_workdir.py', 'test_train_step.py',
              'test_describe.py', 'test_launch_single_node.py', 'test_attention.py', 'test_checkpoint_integrity.py',
              'test_monitoring.py', 'test_table1_smoke.py', 'test_samplers.py', 'test_resume.py')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slurm: on a real one-node Slurm (tests/slurm_cluster.py); .ci/run runs these '
                          'in their own step, `pytest -m slurm`')
  config.addinivalue_line('markers', 'long: minutes of compiling or several processes (TPU-topology compiles, '
                          'multi-host, the GCS emulator); .ci/run runs these in their own step, `pytest -n 2 -m long`')
  if hasattr(config.option, 'loadscopereorder'):  # pytest-xdist: keep the collection order (SLOW_FILES first)
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """SLOW_FILES first, in their order; the other files and every file's tests keep pytest's order."""
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def shared_root(tmp_path_factory):
  """A folder shared by the xdist workers of this run (pytest keeps the last 3 runs' folders)."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the whole run, its xdist workers and their subprocesses.

  Many tests run `python -m groupdiff_jax.main` several times on one config
  (train, resume, sample); each process would recompile the same steps. A
  cached executable is the same compiled program, so results do not change.
  Every program is cached (minimum compile time 0): in-process runs build new
  jitted functions each time, and their sub-second compiles add up.
  """
  directory = str(shared_root(tmp_path_factory) / 'xla_cache')
  os.makedirs(directory, exist_ok=True)
  import jax
  from jax.experimental.compilation_cache import compilation_cache as jax_cache
  names = {'jax_compilation_cache_dir': directory, 'jax_persistent_cache_min_compile_time_secs': 0}
  previous = {name: getattr(jax.config, name) for name in names}
  for name, value in names.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()
  os.environ['JAX_COMPILATION_CACHE_DIR'] = directory
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  yield directory
  for name, value in previous.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()


@pytest.fixture(scope='session')
def trained_digits_run(tmp_path_factory, shared_compilation_cache):
  """The tiny digits demo trained 4 steps by `python -m groupdiff_jax.main` (tests/digits_run.py), once per run.

  The first worker to need it trains it under a file lock; the others wait and
  read it. Tests read its workdir or resume/sample in a `copy` of it.
  """
  from tests import digits_run
  directory = shared_root(tmp_path_factory) / 'trained_digits'
  directory.mkdir(exist_ok=True)
  with open(directory / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    run = digits_run.train_once(directory)
  assert run.returncode == 0, run.stderr[-4000:]
  return run
