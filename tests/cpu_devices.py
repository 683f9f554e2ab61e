"""The environment of a test subprocess with several fake CPU devices."""

import os


def xla_flags(devices):
  """This process's XLA_FLAGS (tests/conftest.py's compile flags) plus `devices` host devices."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def env(devices, **overrides):
  """This process's environment for a subprocess with JAX on `devices` CPU devices, plus `overrides`."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS='cpu', **overrides)
