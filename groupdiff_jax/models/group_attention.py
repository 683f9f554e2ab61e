"""Group attention: the one change GroupDiff makes to a DiT/SiT block.

The tokens of the N members of a group, `[G*N, L, C]`, are attended as one
sequence `[G, N*L, C]` and reshaped back, so every image sees the tokens of
the other images of its group and nothing outside it. With group size 1 (or
the switch off) this is the ordinary per-image self-attention of DiT.

Members of a group are contiguous along the batch axis: rows
`g*N .. g*N + N-1` of the batch form group g. Under a context mesh
(`jax.set_mesh`) whose axes split the batch, a device holds either whole
groups (attention stays on the device) or N/k members of one group, the
group split over k devices of the mesh's group axis (`MeshAxes.group`): then
each device's queries attend the whole group's keys and values, gathered
over that axis inside `jax.shard_map` (the gradient's reverse is a
reduce-scatter), or, with `collective='all_to_all'` (the default of
MeshAxes and of the configs' mesh.group_collective), heads are exchanged for
members (Ulysses) so each device attends the whole group with H/k heads.
Which mesh axes do what is told to the model by the caller that builds the
mesh (`use_mesh_axes`, a context): the model knows no axis names.

Parameter names follow timm's `Attention` as used by DiT:
`attn.qkv` ([C, 3C]: q, k, v each laid out head-major) and `attn.proj`.
"""

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from groupdiff_jax import errors
from groupdiff_jax.models import chunked_attention as chunked
from groupdiff_jax.models.dense import dense_dot_general

# Attention kernels by config name (`model.attention_impl`):
#   'xla'     jax.nn.dot_product_attention in plain XLA: materialises the
#             [T, T] scores (memory ~ T^2).
#   'chunked' exact attention in blocks of CHUNK_SIZE queries per head, with
#             a flash-style backward that recomputes each block's
#             probabilities (memory ~ T per head). Any backend; written for
#             CPU, where the [T, T] softmax of 'xla' is memory-bound. A
#             sequence shorter than CHUNK_SIZE tokens uses 'xla'.
#   'cudnn'   cuDNN flash attention (GPU, bf16/fp16 only): no [T, T] matrix.
#   'splash'  Pallas splash attention (TPU; on other backends it runs in the
#             Pallas interpreter, slowly, which is how it is tested on CPU).
#   'auto'    by the platform of the target devices (target_platform: the
#             context mesh's, else the host's): cuDNN on GPU for bf16/fp16
#             compute (XLA for fp32,
#             which cuDNN does not take), splash on TPU; on CPU 'chunked'
#             for sequences of CHUNK_SIZE tokens or more and 'xla' otherwise
#             (and when the length is not given). At 256 tokens (SiT/2
#             singles, one block per head) 'chunked' took 0.6-0.75x the CPU
#             time of 'xla' (B=16, 6 heads of 64, forward + backward:
#             benchmarks/cpu_train_step.py, docs/benchmarks.md); at 16-64
#             tokens (the digits demo) its loop over heads costs more than
#             it saves. Attention forward + backward
#             on a shared 2-core CPU, fp32, 12 heads of 64: 'chunked' took
#             0.5x the time of 'xla' at T=512 (B=8), 0.4x at T=1024 (B=4)
#             and T=4096 (B=1), where its peak memory was 0.4 GB vs 4.4 GB.
# With N=16 a group is 4096 tokens: on accelerators use 'auto' (or the
# named kernel), never 'xla'.
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'chunked', 'cudnn', 'splash')

# Queries per block of 'chunked': a [256, T] float32 block of scores per head
# is 4 MiB at T=4096 (blocks of 128 to 1024 ran within 10% of each other).
CHUNK_SIZE = 256

SPLASH_MAX_BLOCK = 512


def target_platform():
  """The platform of the devices the program is built for: the context mesh's
  (`jax.set_mesh`, e.g. abstract TPU devices of an AOT compile on a CPU
  host), else JAX's default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  platform = getattr(device, 'platform', None)
  return platform or jax.default_backend()


def check_implementation(implementation):
  """ConfigError unless `implementation` is one of ATTENTION_IMPLEMENTATIONS (starts no backend)."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise errors.ConfigError(f'Unknown model.attention_impl={implementation!r}; '
                             f'choose one of {sorted(ATTENTION_IMPLEMENTATIONS)} (auto: the best for the backend).')


def resolve_implementation(implementation, dtype, backend=None, length=None):
  """The concrete kernel name for `implementation` on `backend` (default: target_platform()), for sequences of
  `length`."""
  check_implementation(implementation)
  if implementation != 'auto':
    return implementation
  backend = backend or target_platform()
  if backend in ('gpu', 'cuda', 'rocm'):
    return 'cudnn' if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else 'xla'
  if backend == 'tpu':
    return 'splash'
  return 'chunked' if length is not None and length >= CHUNK_SIZE else 'xla'


def splash_attention(q, k, v, interpret=None, local=False):
  """Pallas splash attention, full (non-causal) mask. q: [B, Tq, H, D], k, v: [B, Tk, H, D] -> [B, Tq, H, D].

  The kernel works per example on [H, T, D] in blocks of a multiple of 128
  tokens, and does not scale the logits: q is scaled by 1/sqrt(D) here. A
  length that is not a multiple of 128 (only tiny test models: SiT/2 groups
  are 256*N tokens) is padded, padded keys masked out. Head dims that are not
  a multiple of 128 (SiT-XL: 72) are zero-padded for the TPU kernel, which
  changes neither scores nor outputs. local: already inside a per-device
  map (no shard_over_batch).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  if interpret is None:
    interpret = target_platform() != 'tpu'
  batch, q_length, heads, head_dim = q.shape
  kv_length = k.shape[1]
  q = q * jnp.asarray(head_dim**-0.5, q.dtype)
  padded_q, padded_kv = (-(-n // 128) * 128 for n in (q_length, kv_length))
  padded_dim = head_dim if interpret or head_dim % 128 == 0 else -(-head_dim // 128) * 128
  to_heads = lambda a, padded: jnp.pad(a.swapaxes(1, 2), ((0, 0), (0, 0), (0, padded - a.shape[1]),
                                                          (0, padded_dim - head_dim)))  # [B, H, T', D']

  def block_for(length):
    block = SPLASH_MAX_BLOCK
    while length % block:
      block //= 2
    return block

  bq, bkv = block_for(padded_q), block_for(padded_kv)
  sizes = kernels.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  if padded_kv == kv_length and padded_q == q_length:
    head_mask = masks.FullMask((q_length, kv_length))
  else:
    head_mask = masks.NumpyMask(np.broadcast_to(np.arange(padded_kv) < kv_length, (padded_q, padded_kv)).copy())
  kernel = kernels.make_splash_mha(masks.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1,
                                   q_seq_shards=1, interpret=interpret)
  run = jax.vmap(kernel) if local else shard_over_batch(jax.vmap(kernel))
  out = run(to_heads(q, padded_q), to_heads(k, padded_kv), to_heads(v, padded_kv))  # [B, H, Tq', D']
  return out[:, :, :q_length, :head_dim].swapaxes(1, 2)


def chunked_attention(q, k, v, chunk_size=None, local=False):
  """Exact softmax attention without a [T, T] matrix. q: [B, Tq, H, D], k, v: [B, Tk, H, D] -> [B, Tq, H, D].

  The kernels are in models/chunked_attention.py: the B*H heads one after
  the other, each in blocks of about `chunk_size` (default CHUNK_SIZE)
  queries, or, for a sequence of exactly one block, one example (all its
  heads) at a time. Sequences of fewer than `chunk_size` queries use XLA's
  kernel. local: already inside a per-device map (no shard_over_batch).
  """
  chunk_size = chunk_size or CHUNK_SIZE
  if q.shape[1] < chunk_size:
    return jax.nn.dot_product_attention(q, k, v, implementation='xla')
  attend = functools.partial(chunked.attention, chunk_size=chunk_size)
  return attend(q, k, v) if local else shard_over_batch(attend)(q, k, v)


@dataclasses.dataclass(frozen=True)
class MeshAxes:
  """What the context mesh's axes do to a batch of groups, told by the caller that builds the mesh.

  batch: the axes the leading (image) axis is split over, outer first (None:
    every axis of the context mesh). group: the innermost of them, over
    which the members of one group may be split (None: groups are never
    split). collective: how a split group attends, 'all_gather' (keys and
    values gathered over the group axis) or 'all_to_all' (Ulysses: heads
    exchanged for members; needs the group to span the whole axis and the
    heads divisible by it, else keys and values are gathered).
  """
  batch: Optional[Tuple[str, ...]] = None
  group: Optional[str] = None
  collective: str = 'all_to_all'


GROUP_COLLECTIVES = ('all_gather', 'all_to_all')
_MESH_AXES = contextvars.ContextVar('groupdiff_mesh_axes', default=MeshAxes())


@contextlib.contextmanager
def use_mesh_axes(axes):
  """Within the block, traced group attention reads the mesh's axis roles from `axes` (a MeshAxes)."""
  token = _MESH_AXES.set(axes)
  try:
    yield
  finally:
    _MESH_AXES.reset(token)


def _context_batch_axes():
  """(abstract mesh, its batch axes of size > 1) under the context mesh; (mesh, ()) when there is none."""
  mesh = jax.sharding.get_abstract_mesh()
  names = getattr(mesh, 'axis_names', ()) or ()
  wanted = _MESH_AXES.get().batch
  axes = tuple(a for a in (names if wanted is None else wanted) if a in names)
  return mesh, (axes if axes and math.prod(mesh.shape[a] for a in axes) > 1 else ())


def shard_over_batch(fn):
  """`fn` (per-example in its leading axis) run per device under the context mesh.

  A Pallas kernel is an opaque custom call: inside a jit whose batch is split
  over the mesh, XLA cannot partition it and would gather the whole batch
  onto every device. Under a context mesh (`jax.set_mesh`, which
  train_step.make_jitted_train_step sets) `fn` is wrapped in `jax.shard_map`
  over its batch axes (MeshAxes.batch), so each device runs the kernel on its
  own groups. Without a context mesh, or with one device, `fn` is returned
  unchanged.
  """
  mesh, axes = _context_batch_axes()
  if not axes:
    return fn
  spec = P(axes)

  def sharded(*args):
    if args[0].shape[0] % math.prod(mesh.shape[axis] for axis in axes):
      return fn(*args)  # too few groups to split (e.g. a tiny sampling batch): XLA decides
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)

  return sharded


def dot_product_attention(q, k, v, implementation='xla', local=False):
  """Softmax attention. q: [B, Tq, H, D], k, v: [B, Tk, H, D] -> [B, Tq, H, D].

  local: inside a per-device map already (the Pallas and chunked kernels are
  otherwise mapped over the context mesh's batch axes themselves).
  """
  implementation = resolve_implementation(implementation, q.dtype, length=k.shape[1])
  if implementation == 'splash':
    return splash_attention(q, k, v, local=local)
  if implementation == 'chunked':
    return chunked_attention(q, k, v, local=local)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def to_groups(x, group_size):
  """[G*N, L, ...] -> [G, N*L, ...]: the members' tokens become one sequence."""
  batch, length = x.shape[:2]
  if batch % group_size:
    raise ValueError(f'Batch of {batch} images is not a whole number of groups of {group_size}.')
  return x.reshape(batch // group_size, group_size * length, *x.shape[2:])


def from_groups(x, group_size):
  """[G, N*L, ...] -> [G*N, L, ...], the inverse of `to_groups`."""
  groups, length = x.shape[:2]
  return x.reshape(groups * group_size, length // group_size, *x.shape[2:])


def group_split(batch, group_size, mesh_shape, batch_axes, group_axis):
  """Devices one group spans (k; 1 = whole groups per device) for a batch of `batch` images split over
  `batch_axes` of a mesh of `mesh_shape`, the group axis innermost; ValueError naming both sizes when a
  device would hold neither whole groups nor a whole part of one group."""
  devices = math.prod(mesh_shape.get(a, 1) for a in batch_axes)
  split = mesh_shape.get(group_axis, 1) if group_axis in batch_axes else 1
  if group_size == 1 or split == 1:
    return 1
  outer = devices // split
  if batch % (outer * group_size) or (batch // outer) % split:
    raise ValueError(f'mesh.group={split} does not fit groups of {group_size} images: a batch of {batch} images '
                     f'({batch // group_size} groups) over {outer} data x fsdp shards must give each shard whole '
                     f'groups, split evenly over the {split} devices of the group axis.')
  per_device = batch // devices
  if per_device % group_size == 0:
    return 1
  if group_size % per_device:
    raise ValueError(f'mesh.group={split} does not divide the group size {group_size}: {per_device} images per '
                     f'device would hold parts of two groups; make mesh.group a divisor of {group_size} (or a '
                     f'multiple of it, with more groups per data x fsdp shard).')
  return group_size // per_device


def _gather_members(x, axis, members, axis_size):
  """x: [R, ...] of one device -> [members*R, ...]: the rows of the `members` consecutive devices of `axis`
  that hold this device's group (the whole axis: one all-gather; else a ring of collective-permutes)."""
  if members == axis_size:
    return jax.lax.all_gather(x, axis, axis=0, tiled=True)
  parts = [x]
  for shift in range(1, members):
    perm = [(dst - dst % members + (dst % members - shift) % members, dst) for dst in range(axis_size)]
    parts.append(jax.lax.ppermute(x, axis, perm))
  return jnp.concatenate(parts, axis=0)


def _split_group_attention(q, k, v, group_size, implementation, mesh, batch_axes, axes):
  """Group attention with each group split over `members` devices of the group axis. q, k, v: [B, L, H, D]."""
  members = group_split(q.shape[0], group_size, dict(mesh.shape), batch_axes, axes.group)
  split = mesh.shape[axes.group]
  heads = q.shape[2]
  spec = P(batch_axes)
  implementation = resolve_implementation(implementation, q.dtype, length=group_size * q.shape[1])
  ulysses = axes.collective == 'all_to_all' and members == split and heads % split == 0

  def body(q, k, v):  # this device's [R, L, H, D], R = group_size / members
    rows, length = q.shape[:2]
    if ulysses:  # [R, L, H, D] -> [N, L, H/k, D]: all members, some heads
      q, k, v = (jax.lax.all_to_all(a, axes.group, 2, 0, tiled=True) for a in (q, k, v))
      out = dot_product_attention(*(to_groups(a, group_size) for a in (q, k, v)), implementation, local=True)
      return jax.lax.all_to_all(from_groups(out, group_size), axes.group, 0, 2, tiled=True)
    k, v = (_gather_members(a, axes.group, members, split) for a in (k, v))  # [N, L, H, D]
    flat = lambda a: a.reshape(1, a.shape[0] * length, *a.shape[2:])
    out = dot_product_attention(flat(q), flat(k), flat(v), implementation, local=True)  # [1, R*L, H, D]
    return out.reshape(rows, length, *out.shape[2:])

  return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


def group_attention(q, k, v, group_size, implementation='xla'):
  """Attention over all tokens of each group.

  Args:
    q, k, v: [G*N, L, H, D], members of a group contiguous.
    group_size: N; 1 gives per-image attention.
    implementation: one of ATTENTION_IMPLEMENTATIONS.

  Returns:
    [G*N, L, H, D]. Under a context mesh whose group axis (MeshAxes) splits
    a group over devices, computed per device with a collective over that
    axis (module docstring); otherwise each device attends its own groups.
  """
  if group_size == 1:
    return dot_product_attention(q, k, v, implementation)
  axes = _MESH_AXES.get()
  mesh, batch_axes = _context_batch_axes()
  if axes.group and batch_axes and group_split(q.shape[0], group_size, dict(mesh.shape), batch_axes, axes.group) > 1:
    return _split_group_attention(q, k, v, group_size, implementation, mesh, batch_axes, axes)
  q, k, v = (to_groups(a, group_size) for a in (q, k, v))
  out = dot_product_attention(q, k, v, implementation)  # [G, N*L, H, D]
  return from_groups(out, group_size)


class GroupAttention(nn.Module):
  """Multi-head self-attention whose sequence is a whole group."""

  num_heads: int
  implementation: str = 'xla'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, group_size):
    """x: [G*N, L, C] -> [G*N, L, C]; group_size is static (1 = per image)."""
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    dense = lambda features, name: nn.Dense(
        features, kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype, dot_general=dense_dot_general,
        name=name)
    qkv = dense(3 * width, 'qkv')(x).reshape(batch, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, D] each
    if group_size > 1:  # S_cross (evaluation/s_cross.py) reads them; a no-op unless 'intermediates' is mutable
      self.sow('intermediates', 'group_qk', (q, k))
    out = group_attention(q, k, v, group_size, self.implementation)
    return dense(width, 'proj')(out.reshape(batch, length, width))
