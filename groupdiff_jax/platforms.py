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
GPU_DEVICE_PATTERNS = ('/dev/nvidiactl', '/dev/nvidia[0-9]*', '/dev/dxg')
NON_TPU_PLATFORMS = 'cuda,cpu'


def any_device_file(patterns):
  return any(glob.glob(pattern) for pattern in patterns)


def default_platforms(environ, patterns=TPU_DEVICE_PATTERNS, gpu_patterns=GPU_DEVICE_PATTERNS):
  """None (JAX_PLATFORMS is set, or a TPU is here: JAX decides), 'cuda,cpu' (NVIDIA device files) or 'cpu'."""
  if environ.get('JAX_PLATFORMS') is not None or any_device_file(patterns):
    return None
  return NON_TPU_PLATFORMS if any_device_file(gpu_patterns) else 'cpu'


def skip_tpu_probe_without_tpu(environ=None, patterns=TPU_DEVICE_PATTERNS, gpu_patterns=GPU_DEVICE_PATTERNS):
  """Before any backend starts: JAX's platforms from default_platforms. Returns the value set, or None."""
  platforms = default_platforms(os.environ if environ is None else environ, patterns, gpu_patterns)
  if platforms is not None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_platforms', platforms)
  return platforms
