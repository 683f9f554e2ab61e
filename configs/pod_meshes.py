"""The mesh that fits, per TPU pod and global batch, for the XL recipes (docs/scaling.md).

Each entry was compiled for the pod's topology with `--mode=compile`
(benchmarks/fit_table.py; reports in benchmarks/fit_reports/) for
SiT-XL/2 + GroupDiff-l-4 (configs/sit_xl.py); DiT-XL/2 (configs/dit_xl.py)
compiled to the same bytes on v5e-64. `launch/tpu_pod.sh` puts these flags
before the user's own, and leaves them out when the user sets any mesh axis,
remat, train.mode or train.group_size (an entry is a whole mesh for
GroupDiff-l-4):

  python3 configs/pod_meshes.py v5e-64 256    # prints: --config.mesh.data=-1 --config.mesh.fsdp=4

`data=-1` takes the remaining devices, so the flags hold however the pod
lists its devices. The abstract v4 topology of libtpu shows a chip's 2
TensorCores as 2 devices of half the HBM; a real v4 pod in megacore mode
shows one device per chip: the per-chip bytes agree, the batch per device
doubles (not checked on a v4 pod).
Plain Python, no imports: the launching machine needs no JAX.
"""

import sys

# Configs the table was compiled for.
CONFIGS = ('configs/sit_xl.py', 'configs/dit_xl.py')

# Google Cloud accelerator type -> get_topology_desc name (for --config.compile.topology).
TOPOLOGIES = {'v4-32': 'v4:2x2x4', 'v5e-64': 'v5e:8x8', 'v5e-256': 'v5e:16x16', 'v5p-64': 'v5p:4x4x2',
              'v5p-256': 'v5p:4x4x8', 'v6e-64': 'v6e:8x8'}

# (accelerator, global batch) -> (fsdp, remat) (data = the rest of the devices), or why no mesh fits.
# Compiled before mesh.group and mesh.shard_update existed (whole groups per device, replicated state);
# today's defaults (mesh.group=0: a group split over devices where the batch needs it; shard_update on)
# apply beside these flags. No entry (v5e-256 and v5p-256 at batch 256, which need a group split over 4
# and 2 devices): the config's defaults (docs/scaling.md: compiled, they fit with 2.3 and 2.9 GiB per device).
RECOMMENDED = {
    ('v4-32', 256): (1, 'none'),  # 14.3 of 16 GiB per TensorCore
    # Data only, no remat, with the sharded update (the default): 13.98 of 16 GiB per TensorCore (0.4 GiB under
    # the 10% headroom), 184.9 GB accessed, roofline 0.338 s (49%); fsdp=4 + remat=full (5.1 GiB, replicated
    # update) accesses 228.2 GB and recomputes the forward. Without ZeRO, data only with dots_saveable was
    # refused (15.95G > 15.25G).
    ('v4-32', 1024): (1, 'none'),
    # Re-compiled with the sharded update (fifth session): fsdp=4 2.7 GiB, roofline 0.086 s; data only 3.4 GiB,
    # 0.085 s (rows _v5e64_fsdp4_zero / _v5e64_zero): equal within 1%; fsdp=4 kept (it also fits without ZeRO).
    ('v5e-64', 256): (4, 'none'),  # 5.1 of 16 GiB
    # Data only with the sharded update (the default): 7.95 GiB, roofline 0.164 s (35%), 114.5 GB accessed; the
    # replicated fsdp=8 mesh (7.8 GiB) accesses 123.9 GB, 0.151 s at HBM bandwidth before its collectives.
    ('v5e-64', 1024): (1, 'none'),
    # With the sharded update: 2.7 GiB, roofline 0.086 s (17%); data only 5.35 GiB, 0.116 s (12%: data=256 divides
    # no 1152-wide dimension, so those leaves' update stays replicated).
    ('v5e-256', 1024): (4, 'none'),  # 5.1 of 16 GiB (replicated update)
    ('v5p-64', 256): (1, 'none'),  # 14.6 of 95 GiB
    ('v5p-64', 1024): (1, 'none'),  # 21.0 of 95 GiB
    ('v5p-256', 1024): (1, 'none'),  # 14.5 of 95 GiB
    ('v6e-64', 256): (1, 'none'),  # 14.7 of 32 GiB
    ('v6e-64', 1024): (1, 'none'),  # 15.6 of 32 GiB
}


class NoMesh(ValueError):
  """The table says this pod cannot run this batch."""


def mesh_flags(accelerator, batch_size, table=None):
  """The `--config.mesh.*` (and remat) flags for a pod, [] when the table (default RECOMMENDED) has no entry;
  NoMesh when none fits."""
  entry = (RECOMMENDED if table is None else table).get((accelerator, int(batch_size)))
  if entry is None:
    return []
  if isinstance(entry, str):
    raise NoMesh(f'{accelerator} at global batch {batch_size}: {entry} (docs/scaling.md).')
  fsdp, remat = entry
  flags = ['--config.mesh.data=-1', f'--config.mesh.fsdp={fsdp}']
  return flags + ([f'--config.model.remat={remat}'] if remat != 'none' else [])


def main(argv):
  if len(argv) != 3:
    print(f'usage: python3 {argv[0]} ACCELERATOR GLOBAL_BATCH  (e.g. v5e-64 256)', file=sys.stderr)
    return 2
  try:
    print(' '.join(mesh_flags(argv[1], argv[2])))
  except NoMesh as e:
    print(f'Error: {e}', file=sys.stderr)
    return 2
  except ValueError:
    print(f'Error: GLOBAL_BATCH must be an integer, got {argv[2]!r}.', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
