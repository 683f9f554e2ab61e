"""Test setup: repo root importable (for configs/), JAX on CPU."""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Compile tests in parallel workers each load libtpu (no TPU is used); without this the second one is refused.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
  config.addinivalue_line('markers', 'slurm: on a real one-node Slurm (tests/slurm_cluster.py); .ci/run runs these '
                          'in their own step, `pytest -m slurm`')
