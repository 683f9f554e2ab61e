"""XLA_FLAGS for a test subprocess with several fake CPU devices."""

import os


def xla_flags(devices):
  """This process's XLA_FLAGS (tests/conftest.py's compile flags) plus `devices` host devices."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
