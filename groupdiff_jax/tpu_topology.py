"""The TPU a program is compiled for without one: the chip table, the abstract devices of a topology name
(libtpu's `get_topology_desc`) and the config's mesh over them (the compile job, compile_job.py).
"""

import re

import jax

from groupdiff_jax import errors, sharding

# Per chip (per_device divides by the devices a chip shows as): HBM bytes, dense bf16 peak FLOP/s, HBM
# bandwidth and one-way inter-chip (ICI) bandwidth, from Google Cloud's TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB, 275 TFLOP/s, 1200 GB/s; v5e 16 GiB,
# 197 TFLOP/s, 819 GB/s, 400 GB/s bidirectional ICI; v5p 95 GiB, 459 TFLOP/s, 2765 GB/s, 1200 GB/s
# bidirectional ICI; v6e (Trillium) 32 GiB, 918 TFLOP/s, 1638 GB/s, 800 GB/s bidirectional ICI. One-way ICI
# = half the bidirectional figure (for v5e and v6e also the pages' all-reduce bandwidth per pod / 256 chips);
# v4's page gives no per-chip ICI figure: its all-reduce bandwidth per pod (1.1 PB/s) / 4096 chips.
CHIPS = {
    'v4': {'hbm_bytes': 32 * 2**30, 'bf16_flops': 275e12, 'hbm_bandwidth': 1200e9, 'ici_bandwidth': 1.1e15 / 4096},
    'v5e': {'hbm_bytes': 16 * 2**30, 'bf16_flops': 197e12, 'hbm_bandwidth': 819e9, 'ici_bandwidth': 200e9},
    'v5p': {'hbm_bytes': 95 * 2**30, 'bf16_flops': 459e12, 'hbm_bandwidth': 2765e9, 'ici_bandwidth': 600e9},
    'v6e': {'hbm_bytes': 32 * 2**30, 'bf16_flops': 918e12, 'hbm_bandwidth': 1638e9, 'ici_bandwidth': 400e9},
}
TOPOLOGY_FORM = ('<chip>:<AxB> or <chip>:<AxBxC>, chip one of ' + ', '.join(CHIPS) +
                 '; e.g. v5e:2x2, v5e:8x8, v4:2x2x4, v5p:2x2x2, v5p:4x4x4, v6e:8x8')
PIP_TPU = "pip install -e '.[tpu]'"


# --- Devices and mesh ---------------------------------------------------------
def chip_of(topology):
  """'v5p:2x2x2' -> 'v5p'; ConfigError naming the accepted form for anything else."""
  match = re.fullmatch(r'(v4|v5e|v5p|v6e):(\d+)x(\d+)(x\d+)?', topology or '')
  if not match:
    raise errors.ConfigError(f'compile.topology={topology!r} is not a TPU topology name; use {TOPOLOGY_FORM}.')
  return match.group(1)


def abstract_devices(topology, num_slices=1):
  """The abstract TPU devices of `num_slices` slices of `topology` (no TPU needed; libtpu is)."""
  chip_of(topology)
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except ImportError as error:
    raise errors.ConfigError(f'--mode=compile needs libtpu (the TPU compiler), which is not installed: '
                             f'run {PIP_TPU} (about 700 MB).') from error
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                             num_slices=num_slices).devices)
  except Exception as error:  # pylint: disable=broad-except
    if 'libtpu_lockfile' in str(error):
      raise errors.ConfigError('another process holds libtpu (/tmp/libtpu_lockfile): wait for it, or, since '
                               '--mode=compile needs no TPU, run with ALLOW_MULTIPLE_LIBTPU_LOAD=1.') from error
    raise errors.ConfigError(f'compile.topology={topology!r} (num_slices={num_slices}) was refused by the TPU '
                             f'compiler ({str(error).splitlines()[0][:200]}); use {TOPOLOGY_FORM}.') from error


def per_device(chip, devices):
  """The chip's HBM and peak per JAX device: v4 topologies list each of a chip's 2 TensorCores as a device
  (they share the chip's coordinates), so a device has half the chip; v5e/v5p/v6e have one device a chip."""
  chips = {(getattr(d, 'slice_index', 0), tuple(d.coords)) for d in devices}
  cores = max(1, len(devices) // max(1, len(chips)))
  return {'hbm_bytes': chip['hbm_bytes'] // cores, 'bf16_flops': chip['bf16_flops'] / cores,
          'hbm_bandwidth': chip['hbm_bandwidth'] / cores, 'ici_bandwidth': chip['ici_bandwidth'] / cores,
          'devices_per_chip': cores}


def target_mesh(config, devices, num_slices):
  """sharding.make_mesh over the abstract devices; ConfigError when the mesh does not match them."""
  m = config.mesh
  dcn = m.dcn_data * m.dcn_fsdp
  if dcn != num_slices:
    raise errors.ConfigError(f'mesh.dcn_data={m.dcn_data} x mesh.dcn_fsdp={m.dcn_fsdp} = {dcn} '
                             f'but compile.num_slices={num_slices}: the dcn_* axes span the slices; make their '
                             'product the number of slices.')
  try:
    return sharding.config_mesh(config, devices)
  except ValueError as error:
    raise errors.ConfigError(f'{error} ({len(devices)} devices = {num_slices} slice(s) of '
                             f'{config.compile.topology}); set --config.mesh.data / --config.mesh.fsdp so that '
                             'their product (times dcn_*) is the device count.') from error


def with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
