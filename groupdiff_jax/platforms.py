"""Which JAX backends to start: no TPU probe on hosts without a TPU.

With libtpu installed (the TPU wheel), JAX tries the TPU backend first on
every host, and on a CPU/GPU host libtpu prints lines such as "Unable to
initialize backend 'tpu'" or "Failed to open libtpu.so" to stderr, which read
like errors. When JAX_PLATFORMS is not set and the host has no TPU device
files (/dev/accel*, /dev/vfio/<n>: TPU VMs), the platforms become
'cuda,cpu' (a GPU when there is one, else the CPU; JAX skips a listed
platform it has no plugin for). JAX_PLATFORMS set by the user always wins.
"""

import glob
import os

TPU_DEVICE_PATTERNS = ('/dev/accel*', '/dev/vfio/[0-9]*')
NON_TPU_PLATFORMS = 'cuda,cpu'


def host_has_tpu(patterns=TPU_DEVICE_PATTERNS):
  return any(glob.glob(pattern) for pattern in patterns)


def skip_tpu_probe_without_tpu(environ=None, patterns=TPU_DEVICE_PATTERNS):
  """Before any backend starts: JAX_PLATFORMS='cuda,cpu' unless it is set or a TPU is here. Returns the value
  set, or None."""
  environ = os.environ if environ is None else environ
  if environ.get('JAX_PLATFORMS') is not None or host_has_tpu(patterns):
    return None
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', NON_TPU_PLATFORMS)
  return NON_TPU_PLATFORMS
