"""Test setup: repo root importable (for configs/), JAX on CPU."""

import os
import sys

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Compile tests in parallel workers each load libtpu (no TPU is used); without this the second one is refused.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
  config.addinivalue_line('markers', 'slurm: on a real one-node Slurm (tests/slurm_cluster.py); .ci/run runs these '
                          'in their own step, `pytest -m slurm`')


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the whole run, its xdist workers and their subprocesses.

  Many tests run `python -m groupdiff_jax.main` several times on one config
  (train, resume, sample); each process would recompile the same steps. A
  cached executable is the same compiled program, so results do not change.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # shared by the workers of this run; pytest keeps the last 3 runs' folders
  directory = str(root / 'xla_cache')
  os.makedirs(directory, exist_ok=True)
  import jax
  from jax.experimental.compilation_cache import compilation_cache as jax_cache
  names = {'jax_compilation_cache_dir': directory, 'jax_persistent_cache_min_compile_time_secs': 1.0}
  previous = {name: getattr(jax.config, name) for name in names}
  for name, value in names.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()
  os.environ['JAX_COMPILATION_CACHE_DIR'] = directory
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '1'
  yield directory
  for name, value in previous.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()
