"""A process whose cluster never forms fails within JAX_INITIALIZATION_TIMEOUT, naming itself."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_join_timeout_names_the_process():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]  # nobody listens: process 0 never starts
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_INITIALIZATION_TIMEOUT='3', PYTHONPATH=ROOT)
  code = f'from groupdiff_jax import distributed; distributed.initialize("127.0.0.1:{port}", 2, 1)'
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'Process 1 could not join the 2-process cluster within 3 s (JAX_INITIALIZATION_TIMEOUT)' in result.stderr
