"""A process whose cluster never forms fails after JAX_INITIALIZATION_TIMEOUT, its log naming it.

JAX ends the process from C++ when the deadline passes (no Python
exception), so the name is in the line logged just before the wait.
"""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_join_timeout_names_the_process():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]  # nobody listens: process 0 never starts
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_INITIALIZATION_TIMEOUT='1', PYTHONPATH=ROOT)
  code = f'import logging; logging.basicConfig(level=logging.INFO); from groupdiff_jax import distributed; distributed.initialize("127.0.0.1:{port}", 2, 1)'
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert f'Process 1 joining the 2-process cluster (127.0.0.1:{port}: waits up to 1 s' in result.stderr
  assert 'DEADLINE_EXCEEDED' in result.stderr, result.stderr[-3000:]
