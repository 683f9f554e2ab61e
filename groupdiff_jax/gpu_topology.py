"""The GPUs a program is compiled for without one: the chip table, the compile-only CUDA devices of a topology
name and the compiler options of such a compile (the compile job, compile_job.py; the TPU side is
tpu_topology.py).

`--config.compile.topology=h100:8` is one host of 8 H100s, `h100:4x8` four hosts of 8 (a multi-process run).
The devices come from the CUDA PJRT plugin's compile-only topology (`jax.experimental.topologies.
get_topology_desc('cuda', target_config=...)`), described by a GpuTargetConfigProto built here from the chip
table, so XLA's GPU compiler (cuDNN flash attention, NCCL collectives, its memory assignment) runs on a host
with no GPU. It needs the plugin and cuDNN: PIP_GPU_COMPILE.
"""

import re

from groupdiff_jax import errors

# Per GPU, from NVIDIA's data sheets (nvidia.com/en-us/data-center/h100, /h200; SXM parts): HBM bytes
# (80 GB, 141 GB), dense BF16 tensor-core peak (989 TFLOP/s: the sheets' 1,979 is with 2:4 sparsity), HBM
# bandwidth (3.35, 4.8 TB/s) and one-way NVLink bandwidth (900 GB/s total per GPU, half each way; in the TPU
# table's `ici_bandwidth` slot; no roofline uses it, as a GPU compile has no cost analysis). HOPPER_SM
# describes the streaming multiprocessors to XLA (both chips: 132 SMs of compute capability 9.0, 1.98 GHz
# boost, 50 MiB L2, 228 KiB shared memory per SM); XLA reads them to choose kernel tilings.
GPUS = {
    'h100': {'hbm_bytes': 80 * 10**9, 'bf16_flops': 989e12, 'hbm_bandwidth': 3.35e12, 'ici_bandwidth': 450e9,
             'device_kind': 'NVIDIA H100 80GB HBM3'},
    'h200': {'hbm_bytes': 141 * 10**9, 'bf16_flops': 989e12, 'hbm_bandwidth': 4.8e12, 'ici_bandwidth': 450e9,
             'device_kind': 'NVIDIA H200'},
}
HOPPER_SM = {'core_count': 132, 'clock_rate_ghz': 1.98, 'l2_cache_size': 50 * 2**20,
             'shared_memory_per_core': 228 * 2**10, 'shared_memory_per_block_optin': 227 * 2**10,
             'compute_capability': (9, 0)}
CUDNN_VERSION = (9, 8)  # the cuDNN the compile assumes: the oldest nvidia-cudnn-cu12 PIP_GPU_COMPILE allows
GPU_TOPOLOGY_FORM = ('<gpu>:<G> (G GPUs of one host) or <gpu>:<H>x<G> (H hosts of G GPUs), gpu one of ' +
                     ', '.join(GPUS) + '; e.g. h100:8, h100:4x8, h200:8')
PIP_GPU_COMPILE = "pip install -e '.[gpu-compile]'"

# A deviceless compile cannot autotune, and XLA's Triton GEMM emitter then failed on a weight-gradient dot of
# the group-split step (h100:8, SiT-XL/2, mesh.group=2: "Couldn't find output tile sizes"); cuBLAS GEMMs
# compile. So GEMMs go to cuBLAS here: a run on GPUs may pick Triton kernels for some of them.
COMPILER_OPTIONS = {'xla_gpu_enable_triton_gemm': False}


def parse(topology):
  """'h100:4x8' -> ('h100', 4, 8); 'h100:8' -> ('h100', 1, 8); None when `topology` does not name a GPU."""
  match = re.fullmatch(r'([a-z]\d+):(?:(\d+)x)?(\d+)', topology or '')
  if not match or match.group(1) not in GPUS:
    return None
  hosts, per_host = int(match.group(2) or 1), int(match.group(3))
  if hosts < 1 or per_host < 1:
    raise errors.ConfigError(f'compile.topology={topology!r} has no GPUs; use {GPU_TOPOLOGY_FORM}.')
  return match.group(1), hosts, per_host


def target_config(gpu):
  """The GpuTargetConfigProto (text format) XLA compiles for: the chip's SMs, memory and cuDNN version."""
  chip, sm = GPUS[gpu], HOPPER_SM
  major, minor = sm['compute_capability']
  info = {'threads_per_block_limit': 1024, 'threads_per_warp': 32, 'shared_memory_per_block': 48 * 2**10,
          'shared_memory_per_core': sm['shared_memory_per_core'], 'threads_per_core_limit': 2048,
          'core_count': sm['core_count'], 'fpus_per_core': 128, 'block_dim_limit_x': 2**31 - 1,
          'block_dim_limit_y': 65535, 'block_dim_limit_z': 65535,
          'memory_bandwidth': int(chip['hbm_bandwidth']), 'l2_cache_size': sm['l2_cache_size'],
          'clock_rate_ghz': sm['clock_rate_ghz'], 'device_memory_size': chip['hbm_bytes'],
          'shared_memory_per_block_optin': sm['shared_memory_per_block_optin'],
          'registers_per_core_limit': 65536, 'registers_per_block_limit': 65536}
  lines = ['gpu_device_info {'] + [f'  {k}: {v}' for k, v in info.items()]
  lines += [f'  cuda_compute_capability {{ major: {major} minor: {minor} }}', '}',
            'platform_name: "CUDA"',
            f'dnn_version_info {{ major: {CUDNN_VERSION[0]} minor: {CUDNN_VERSION[1]} }}',
            f'device_description_str: "{chip["device_kind"]}"']
  return '\n'.join(lines) + '\n'


def abstract_devices(topology):
  """The compile-only CUDA devices of `topology` (no GPU needed; the CUDA plugin and cuDNN are)."""
  parsed = parse(topology)
  if parsed is None:
    raise errors.ConfigError(f'compile.topology={topology!r} is not a GPU topology name; use {GPU_TOPOLOGY_FORM}.')
  gpu, hosts, per_host = parsed
  try:
    import jax_cuda12_plugin  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    from nvidia import cudnn  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except ImportError as error:
    raise errors.ConfigError(f'--mode=compile for {topology} needs the CUDA plugin and cuDNN (the GPU compiler), '
                             f'which are not installed: run {PIP_GPU_COMPILE}.') from error
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    description = topologies.get_topology_desc(gpu, 'cuda', target_config=target_config(gpu),
                                               topology=f'1x{hosts}x{per_host}')
  except Exception as error:  # pylint: disable=broad-except
    raise errors.ConfigError(f'the CUDA plugin refused compile.topology={topology!r} '
                             f'({str(error).splitlines()[0][:200]}); the plugin must match jaxlib: run '
                             f'{PIP_GPU_COMPILE} again.') from error
  return list(description.devices)


def per_device(gpu):
  """The chip table's figures for one device (a GPU is one device)."""
  return {k: v for k, v in GPUS[gpu].items() if k != 'device_kind'} | {'devices_per_chip': 1}
