"""The devices a compile targets, by the name in compile.topology: abstract TPUs (tpu_topology.py: v5p:4x4x8)
or compile-only GPUs (gpu_topology.py: h100:8), with the chip figures and compiler options that go with them."""

from groupdiff_jax import errors, gpu_topology
from groupdiff_jax.tpu_topology import CHIPS, abstract_devices, chip_of, per_device


def target_devices(compile_config):
  """(devices, per-device chip figures, compiler options) of compile.topology: compile-only GPUs
  (gpu_topology.py: h100:8) or abstract TPUs (tpu_topology.py: v5p:4x4x8)."""
  cc = compile_config
  gpu = gpu_topology.parse(cc.topology)
  if gpu is None:
    try:
      chip = chip_of(cc.topology)
    except errors.ConfigError as error:
      raise errors.ConfigError(f'{error} For GPUs: {gpu_topology.GPU_TOPOLOGY_FORM}.') from None
    devices = abstract_devices(cc.topology, cc.num_slices)
    return devices, per_device(CHIPS[chip], devices), None
  if cc.num_slices != 1:
    raise errors.ConfigError(f'compile.num_slices={cc.num_slices} is for TPU slices; a GPU topology names its '
                             f'hosts instead ({gpu_topology.GPU_TOPOLOGY_FORM}): set compile.num_slices=1.')
  if cc.breakdown:
    raise errors.ConfigError(f'compile.breakdown=True splits the bytes accessed of the cost analysis, which a '
                             f'compile for GPUs without one ({cc.topology}) does not give: leave it False.')
  return gpu_topology.abstract_devices(cc.topology), gpu_topology.per_device(gpu[0]), gpu_topology.COMPILER_OPTIONS
