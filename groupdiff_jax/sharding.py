"""Device mesh, parameter sharding rules and the group-wise batch sharding.

Mesh: three named axes, `data` (data parallelism), `fsdp` (parameters, EMA
and optimizer state split over it, gathered per layer by XLA) and `group`
(the members of one group split over it: group-parallel attention). Sizes
come from `config.mesh` (one of data/fsdp may be -1 = the rest); an optional
`dcn_data`/`dcn_fsdp` split puts the slower across-slice / across-host links
on the outer dimension (MaxText / lm1b style); `group` stays inside a slice.

Parameters are sharded by rules matched on their path (big_vision style):
the model code holds no sharding annotations. The default rules put a
weight matrix's largest dimension that the `fsdp` axis divides over `fsdp`
and replicate biases, norms, small tables and scalars. Optimizer state
(Adam's mu and nu) has the parameters' paths inside it, so the same rules
shard it like the parameters. With `mesh.shard_update` (ZeRO-2) the float32
parameters, the EMA and the optimizer state are further split over `data`
(and `group`), so each device clips, guards and updates only its slice: XLA
reduce-scatters the gradients into that layout, and the step all-gathers the
parameters once, in the compute dtype, for the model (`compute_sharding`:
the same spec without the update axes; train_step.gather_for_compute).

The batch is split over (data, fsdp, group) with `group` innermost: a
sub-batch of G groups of N images is laid out `[G*N, ...]` with the members
of a group contiguous, G must be a multiple of data*fsdp, and each of the
`group` devices of a (data, fsdp) shard holds either whole groups or N/k
members of one group (k of them hold a group; group attention then gathers
over `group`: models/group_attention.py). `check_groups_fit_mesh` enforces
it. The model learns the axes' roles from `use_mesh` (a context), not from
this module.
"""

import contextlib
import itertools
import math
import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from groupdiff_jax import errors, step_plan
from groupdiff_jax.models import group_attention

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
GROUP_AXIS = 'group'
MESH_AXES = (DATA_AXIS, FSDP_AXIS, GROUP_AXIS)
# The batch (leading, image) axis of every input and activation; `group` innermost (a group's members are
# contiguous, so the devices of one group are neighbours on the mesh).
BATCH_AXES = (DATA_AXIS, FSDP_AXIS, GROUP_AXIS)

# Logical axis names -> mesh axes, for activations (flax
# `nn.logical_axis_rules` format). Activations are split by batch only:
# sequence and channels stay whole (a group split over `group` is gathered inside group attention).
ACTIVATION_RULES = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('embed', None),
    ('heads', None),
    ('mlp', None),
)

# Parameter rules: (regex searched in the '/'-joined path, rule). The first
# match wins. Rules: 'fsdp' = the largest dimension divisible by the fsdp
# size goes over `fsdp` (replicated if none is, or if the leaf is small);
# 'replicate'. Paths include the optimizer-state prefix (e.g.
# 'opt_state/1/0/mu/blocks_0/attn/qkv/kernel'), hence `search`.
PARAM_RULES = (
    (r'(^|/)(kernel|embedding)$', 'fsdp'),
    (r'.*', 'replicate'),
)
# Leaves with fewer elements stay replicated: splitting them saves little
# memory and costs a collective per use.
MIN_SHARDED_SIZE = 2**14


# --- Mesh --------------------------------------------------------------------
def mesh_shape(num_devices, data=-1, fsdp=1, group=1):
  """(data, fsdp, group) sizes whose product is num_devices; one of data, fsdp may be -1."""
  sizes = [data, fsdp]
  if sizes.count(-1) > 1:
    raise errors.ConfigError(f'At most one of mesh.data={data}, mesh.fsdp={fsdp} may be -1.')
  if group < 1:
    raise errors.ConfigError(f'mesh.group={group} must be a positive number of devices.')
  known = math.prod(s for s in sizes if s != -1) * group
  if known <= 0 or num_devices % known:
    raise errors.ConfigError(f'mesh.data={data} x mesh.fsdp={fsdp} x mesh.group={group} does not divide the '
                             f'{num_devices} devices.')
  sizes = [num_devices // known if s == -1 else s for s in sizes] + [group]
  if math.prod(sizes) != num_devices:
    raise errors.ConfigError(f'mesh.data={data} x mesh.fsdp={fsdp} x mesh.group={group} = {math.prod(sizes)} != '
                             f'{num_devices} devices.')
  return tuple(sizes)


def auto_group(kinds, num_devices, data=-1, fsdp=1, dcn=(1, 1, 1)):
  """mesh.group=0: the smallest group split with which every sub-batch of `kinds` (step kinds: tuples of
  step_plan.SubBatch) divides over the mesh; 1 when none does (check_groups_fit_mesh then says why).

  num_devices: devices per slice (dcn: the across-slice factors of data, fsdp, group). No kinds: 1.
  """
  kinds = tuple(kinds)
  for split in range(1, num_devices + 1 if kinds else 2):
    if num_devices % split:
      continue
    try:
      shape = mesh_shape(num_devices, data, fsdp, split)
    except errors.ConfigError:
      continue
    full = dict(zip(MESH_AXES, (size * outer for size, outer in zip(shape, dcn))))
    try:
      for kind in kinds:
        check_groups_fit_mesh(kind, full)
    except errors.ConfigError:
      continue
    return split
  return 1


def make_mesh(mesh_config=None, devices=None, kinds=()):
  """A ('data', 'fsdp', 'group') mesh over `devices` (default: all devices).

  mesh_config: the config's `mesh` section (fields data, fsdp, group,
  dcn_data, dcn_fsdp: the across-slice/host part of each axis; with
  a DCN part, data and fsdp are the sizes inside one slice/host and the mesh
  is (data*dcn_data, fsdp*dcn_fsdp, group)). None: all devices on `data`
  (pure data parallelism), fsdp and group of 1. group=0 (the default) picks
  the smallest split of a group over devices that the step `kinds` need
  (auto_group: 1, whole groups per device, wherever they fit).
  """
  devices = list(jax.devices() if devices is None else devices)
  if mesh_config is None:
    sizes, dcn = (-1, 1, 1), (1, 1, 1)
  else:
    sizes = (mesh_config.data, mesh_config.fsdp, mesh_config.group)
    dcn = (mesh_config.dcn_data, mesh_config.dcn_fsdp, 1)
  num_slices = math.prod(dcn)
  group = sizes[2]
  if group == 0:
    group = auto_group(kinds, len(devices) // num_slices, sizes[0], sizes[1], dcn)
  if num_slices > 1:
    # Slices (TPU) or hosts (GPU): the DCN part is the outer dimension.
    per_slice = mesh_shape(len(devices) // num_slices, sizes[0], sizes[1], group)
    # TPU: the granule is a slice (ICI inside, DCN between); GPU: a host.
    grid = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices,
                                                process_is_granule=devices[0].platform != 'tpu')
    return Mesh(grid, MESH_AXES)
  shape = mesh_shape(len(devices), sizes[0], sizes[1], group)
  grid = None
  if _has_chip_layout(devices):
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except NotImplementedError:
      # The sizes are not products of the physical axes (fsdp=4 on an 8x8 slice).
      pass
  if grid is None:
    grid = np.asarray(devices).reshape(shape)  # row-major: the order the devices are listed in
  return Mesh(grid, MESH_AXES)


def config_mesh(config, devices=None):
  """make_mesh for a whole config: its `mesh` section, and its step kinds for mesh.group=0 (auto)."""
  train = config.train
  kinds = step_plan.step_kinds(train.batch_size, train.group_size, train.group_ratio, train.mode, train.mixed_steps)
  return make_mesh(config.mesh, devices, kinds=kinds.values())


def model_axes(mesh_config=None):
  """What the mesh's axes do, for the model (group_attention.MeshAxes)."""
  collective = mesh_config.group_collective if mesh_config is not None else 'all_to_all'
  if collective not in group_attention.GROUP_COLLECTIVES:
    raise errors.ConfigError(f'Unknown mesh.group_collective={collective!r}; choose one of '
                             f'{group_attention.GROUP_COLLECTIVES}.')
  return group_attention.MeshAxes(batch=BATCH_AXES, group=GROUP_AXIS, collective=collective)


@contextlib.contextmanager
def use_mesh(mesh, mesh_config=None):
  """`jax.set_mesh(mesh)` plus the axes' roles for group attention: wrap tracing/lowering of a step in it."""
  with jax.set_mesh(mesh), group_attention.use_mesh_axes(model_axes(mesh_config)):
    yield


# Kinds whose chips jax's mesh_utils lays out with several devices (cores) each; on the others it asks
# for one device per chip ("megacore").
_MULTI_CORE_LAYOUT_KINDS = ('TPU v2', 'TPU v3', 'TPU v5p', 'TPU7x', 'TPU7', 'TPU8i')


def _has_chip_layout(devices):
  """Whether mesh_utils.create_device_mesh can place `devices` by their chips' coordinates.

  Not TPU: always (CPU devices keep their order, GPUs are sorted by id). TPU: only when the chips fill a
  cuboid (not, e.g., the first 3 of a host's 4 chips: sample_job.local_mesh)
  and each chip shows one device, or several on a kind laid out by core
  (abstract v4 topologies list both TensorCores of a chip); else jax raises
  an AssertionError and the devices keep row-major order.
  """
  if devices[0].platform != 'tpu':
    return True
  chips = {tuple(d.coords) for d in devices}
  box = math.prod(max(c[i] for c in chips) - min(c[i] for c in chips) + 1 for i in range(3))
  cores = len(devices) // len(chips)
  if box != len(chips) or cores * len(chips) != len(devices):
    return False
  return cores == 1 or devices[0].device_kind in _MULTI_CORE_LAYOUT_KINDS


def replicated(mesh):
  return NamedSharding(mesh, P())


def num_batch_shards(mesh):
  return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def logical_spec(logical_axes, rules=ACTIVATION_RULES):
  """PartitionSpec of an activation from its logical axis names, e.g. ('batch', 'length', 'embed')."""
  table = dict(rules)
  return P(*(table[name] for name in logical_axes))


def batch_sharding(mesh):
  """Leading (image) axis split over (data, fsdp, group)."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def check_groups_fit_mesh(sub_batches, mesh):
  """ConfigError unless every sub-batch's groups divide evenly: whole groups per (data, fsdp) shard, and per
  device whole groups or an equal part of one group (mesh.group). mesh: a Mesh or its {axis: size}."""
  shape = dict(getattr(mesh, 'shape', mesh))
  split = shape.get(GROUP_AXIS, 1)
  shards = math.prod(shape.get(a, 1) for a in BATCH_AXES) // split
  for sub in sub_batches:
    if split > 1 and sub.group_size > 1 and sub.group_size % split and split % sub.group_size:
      raise errors.ConfigError(f'mesh.group={split} does not divide the group size {sub.group_size} (nor is a '
                               f'multiple of it): a device would hold parts of two groups; use a mesh.group that '
                               f'divides {sub.group_size}.')
    if sub.num_groups % shards or (sub.num_images // shards) % split:
      what = f'{shards} data x fsdp shards' + (f' x mesh.group={split}' if split > 1 else '')
      need = shards * sub.group_size * split // math.gcd(split, sub.group_size)
      raise errors.ConfigError(f'{sub.num_groups} groups of {sub.group_size} images cannot be split evenly over '
                               f'{what} (whole groups per data x fsdp shard); make the batch a multiple of '
                               f'{need} images'
                               + (' or change mesh.group.' if split > 1 else ' or split groups with mesh.group.'))
    try:
      group_attention.group_split(sub.num_images, sub.group_size, shape, BATCH_AXES, GROUP_AXIS)
    except ValueError as error:
      raise errors.ConfigError(str(error)) from error


# --- Parameter and state sharding --------------------------------------------
def path_string(path):
  """A jax key path -> 'a/b/0/c'."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


# The state's leaves that `shard_update` splits over the replicated axes too: the float32 parameters the
# update writes (the model reads a gathered copy), the EMA and Adam's mu and nu (the gradients follow them:
# ZeRO-2).
UPDATE_STATE = r'^(params|ema_params|opt_state)/'


def param_spec(path, shape, fsdp_size, rules=PARAM_RULES, min_size=MIN_SHARDED_SIZE, update_axes=()):
  """PartitionSpec of one leaf from the first rule matching its path.

  update_axes: ((axis, size), ...) of the replicated axes over which leaves
  matching UPDATE_STATE are split as well (ZeRO), whatever their rule (only
  the update reads them; the model reads parameters gathered once a step),
  on the largest dimension that their product (times fsdp on a dimension
  already over fsdp) divides; where no dimension takes all of them, over the
  largest subset that one takes (e.g. data=64 alone where data x group = 256
  divides neither 1152 nor 3456).
  """
  for pattern, rule in rules:
    if re.search(pattern, path):
      break
  else:
    rule = 'replicate'
  if rule not in ('replicate', 'fsdp'):
    raise ValueError(f'Unknown sharding rule {rule!r} for {path}.')
  if math.prod(shape) < min_size:
    return P()
  spec = [None] * len(shape)
  # Largest dimension first; ties go to the later (output) dimension.
  order = sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True)
  if fsdp_size > 1 and rule == 'fsdp':
    for dim in order:
      if shape[dim] % fsdp_size == 0:
        spec[dim] = FSDP_AXIS
        break
  extra = tuple((a, size) for a, size in update_axes if size > 1)
  if extra and re.search(UPDATE_STATE, path):
    subsets = sorted((c for r in range(len(extra), 0, -1) for c in itertools.combinations(extra, r)),
                     key=lambda c: -math.prod(size for _, size in c))  # stable: data before group on a tie
    for subset in subsets:
      split = math.prod(size for _, size in subset)
      dim = next((d for d in order if shape[d] % (split * (fsdp_size if spec[d] else 1)) == 0), None)
      if dim is not None:
        axes = ((spec[dim],) if spec[dim] else ()) + tuple(a for a, _ in subset)
        spec[dim] = axes[0] if len(axes) == 1 else axes
        break
  return P(*spec) if any(spec) else P()


def compute_sharding(named_sharding):
  """A state leaf's sharding without the update axes (data, group): the parameters as the model reads them,
  gathered from each device's update slice."""
  def keep(entry):
    kept = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a not in (DATA_AXIS, GROUP_AXIS))
    return kept[0] if len(kept) == 1 else (kept or None)

  spec = [keep(entry) if entry else None for entry in named_sharding.spec]
  return NamedSharding(named_sharding.mesh, P(*spec) if any(spec) else P())


def update_axes(mesh, shard_update):
  """((axis, size), ...) over which the parameters, EMA and optimizer state are split besides fsdp: the data
  and group axes with `shard_update`, none without."""
  return tuple((a, mesh.shape[a]) for a in (DATA_AXIS, GROUP_AXIS) if a in mesh.shape) if shard_update else ()


def tree_shardings(tree, mesh, rules=PARAM_RULES, min_size=MIN_SHARDED_SIZE, shard_update=False):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  fsdp_size = mesh.shape[FSDP_AXIS]
  extra = update_axes(mesh, shard_update)

  def one(path, leaf):
    return NamedSharding(mesh, param_spec(path_string(path), tuple(np.shape(leaf)), fsdp_size, rules, min_size,
                                          extra))

  return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(abstract_state, mesh, rules=PARAM_RULES, min_size=MIN_SHARDED_SIZE, shard_update=False):
  """Shardings for a whole TrainState (params, EMA, optimizer state alike; with `shard_update` all three
  split over data and group too)."""
  return tree_shardings(abstract_state, mesh, rules, min_size, shard_update)


def state_shardings_from_config(abstract_state, mesh, mesh_config):
  """state_shardings with the config's `mesh.min_sharded_size` and `mesh.shard_update` (None: defaults)."""
  if mesh_config is None:
    return state_shardings(abstract_state, mesh)
  return state_shardings(abstract_state, mesh, min_size=mesh_config.min_sharded_size,
                         shard_update=mesh_config.shard_update)


def bytes_per_device(tree, shardings):
  """Bytes each device holds of `tree` under `shardings` (evenly split)."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    split = math.prod(sh.mesh.shape[a] for entry in sh.spec if entry for a in
                      (entry if isinstance(entry, tuple) else (entry,)))
    total += np.dtype(leaf.dtype).itemsize * math.prod(leaf.shape) // split
  return total


# --- Multi-host input --------------------------------------------------------
def host_batch_slice(mesh, num_images):
  """The rows [start, stop) of a global batch of `num_images` this process feeds.

  With the batch sharded over (data, fsdp), the devices of one process hold
  one contiguous block of rows when the process is the outer mesh dimension
  (which make_mesh arranges); raise if not.
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((num_images,))
  rows = sorted({(s[0].start or 0, num_images if s[0].stop is None else s[0].stop) for s in index_map.values()})
  start, stop = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  if covered != stop - start:
    raise ValueError(f'This process\'s devices hold non-contiguous rows {rows} of the batch; '
                     'build the mesh with make_mesh (processes as the outer dimension).')
  return start, stop


def global_batch(local_parts, mesh, global_sizes):
  """Global arrays from this process's rows of every sub-batch.

  local_parts: tuple of dicts of numpy arrays (this host's rows, whole
  groups); global_sizes: images per sub-batch, globally.
  """
  sharding = batch_sharding(mesh)
  out = []
  for part, size in zip(local_parts, global_sizes):
    out.append({k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (size,) + np.shape(v)[1:])
                for k, v in part.items()})
  return tuple(out)
