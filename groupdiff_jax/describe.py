"""`--mode=describe`: what a config will cost, without training.

Prints first (in seconds, nothing compiled) the parameter count, FLOPs per
train step (forward + backward, group attention included) computed
analytically, the mesh, the global and per-host batch in images and groups,
and an estimate of the per-device memory for parameters, EMA, optimizer
state, gradients and activations; then the FLOPs cross-checked with XLA's
cost analysis of compiled train steps of depth-reduced copies of the model,
extrapolated linearly to its depth (`flop_check`).

FLOPs count a multiply-add as 2. (The DiT paper's "119 GFLOPs" for
DiT-XL/2 counts multiply-adds, i.e. 238 GFLOPs here.) A train step is
forward + backward = 3x the forward; with `model.remat='full'` the hardware
does one more forward (reported separately: MFU uses the model FLOPs).

Also the sampling costs the training monitor states (`sampling_flops`,
`grid_cost`: a sample grid's FLOPs against the training FLOPs between two
grids).
"""

import concurrent.futures
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from absl import logging

from groupdiff_jax import sharding, step_plan
from groupdiff_jax import train_step as train_step_lib
from groupdiff_jax.models.dit import model_from_config, parse_variant

TIMESTEP_FREQUENCIES = 256  # TimestepEmbedder's sinusoid width (DiT)
ADAM_BUFFERS = 2  # mu and nu


@dataclasses.dataclass(frozen=True)
class Arch:
  """The shape of a DiT/SiT, as the FLOP count needs it."""
  depth: int
  hidden_size: int
  num_heads: int
  patch_size: int
  input_size: int
  in_channels: int
  out_channels: int
  mlp_ratio: float = 4.0
  group_layers: tuple = (0, None)

  @property
  def tokens(self):
    return (self.input_size // self.patch_size)**2

  def num_group_layers(self):
    start, stop = self.group_layers
    return len(range(self.depth)[start:stop])


def arch_from_config(model_config):
  arch = parse_variant(model_config.variant)
  arch.update({k: model_config[k] for k in ('depth', 'hidden_size', 'num_heads') if model_config[k]})
  return Arch(input_size=model_config.input_size, in_channels=model_config.in_channels,
              out_channels=model_config.in_channels * (2 if model_config.learn_sigma else 1),
              mlp_ratio=model_config.mlp_ratio,
              group_layers=tuple(model_config.group_layers) if model_config.group_layers else (0, None), **arch)


def forward_flops(arch, group_size=1):
  """FLOPs of one image's forward pass when it is in a group of `group_size`.

  Returns a dict: 'matmul' (dense layers, patch embedding), 'attention'
  (scores and weighted values: each query attends to group_size * L keys
  in the blocks with group attention) and 'total'.
  """
  L, C, p = arch.tokens, arch.hidden_size, arch.patch_size
  mlp = int(C * arch.mlp_ratio)
  per_block = 2 * C * 6 * C + 2 * L * C * 3 * C + 2 * L * C * C + 2 * 2 * L * C * mlp  # adaLN, qkv, proj, mlp
  matmul = (2 * L * p * p * arch.in_channels * C  # patch embedding
            + 2 * (TIMESTEP_FREQUENCIES * C + C * C)  # timestep MLP
            + arch.depth * per_block
            + 2 * C * 2 * C + 2 * L * C * p * p * arch.out_channels)  # final layer
  group_layers = arch.num_group_layers()
  keys = [group_size * L] * group_layers + [L] * (arch.depth - group_layers)
  attention = sum(2 * 2 * L * k * C for k in keys)  # q.k^T and p.v over all heads
  return {'matmul': matmul, 'attention': attention, 'total': matmul + attention}


def step_flops(arch, kind, remat='none'):
  """Model FLOPs of one train step of `kind` (3x forward) and hardware FLOPs (with remat)."""
  forward = sum(sub.num_images * forward_flops(arch, sub.group_size)['total'] for sub in kind)
  extra = forward if remat == 'full' else 0
  return {'model': 3 * forward, 'hardware': 3 * forward + extra}


def sampler_nfe(sample_config, model_config):
  """Model evaluations per branch of one sampler run; None for the adaptive dopri5."""
  from groupdiff_jax import diffusion as gd
  from groupdiff_jax import sample, samplers
  method = sample_config.sampler
  if model_config.objective == 'dit':
    return gd.create_schedule(sample.timestep_respacing(sample_config)).num_timesteps
  if method == 'dopri5':
    return None
  if method == 'sde':
    return sample_config.num_steps
  return samplers.number_of_function_evaluations(sample_config.num_steps, method)


def sampling_flops(config, num_images):
  """Upper bound of the FLOPs of sampling `num_images` (NFE x forward FLOPs of both CFG branches, group attention
  and guidance at every step); None for dopri5."""
  arch = arch_from_config(config.model)
  nfe = sampler_nfe(config.sample, config.model)
  if nfe is None:
    return None
  s = config.sample
  per_image = forward_flops(arch, s.cond_group_size)['total']
  if s.cfg_scale != 1.0:
    per_image += forward_flops(arch, s.uncond_group_size)['total']
  return nfe * num_images * per_image


def grid_cost(config):
  """The grid's FLOPs against the training FLOPs between two grids (the cheapest step kind: an upper bound).

  Returns {'grid_flops', 'train_step_flops', 'ratio'} (ratio None when
  train.sample_every is 0 or the sampler is adaptive).
  """
  t = config.train
  arch = arch_from_config(config.model)
  kinds = step_plan.step_kinds(t.batch_size, t.group_size, t.group_ratio, t.mode, t.mixed_steps)
  train_flops = min(step_flops(arch, kind)['model'] for kind in kinds.values())
  grid = sampling_flops(config, config.sample.grid_groups * config.sample.images_per_group)
  every = t.sample_every
  ratio = grid / (every * train_flops) if grid is not None and every else None
  return {'grid_flops': grid, 'train_step_flops': train_flops, 'ratio': ratio}


def activation_bytes_per_image(arch, group_size, remat, compute_bytes, attention_impl, platform=None):
  """Rough bytes kept for the backward pass per image (all blocks).

  Per token and block, without remat: ~20 C values (norms, modulations,
  q/k/v, attention output, MLP hidden before and after GELU, residuals),
  plus the [H, T] softmax probabilities of each query when the kernel is
  XLA's (flash kernels keep one log-sum-exp per head). 'dots_saveable'
  keeps the matmul outputs (~10 C + scores); 'full' keeps only each block's
  input (C, float32) plus one block recomputed at a time.
  """
  L, C, H, depth = arch.tokens, arch.hidden_size, arch.num_heads, arch.depth
  keys = group_size * L
  if attention_impl == 'auto':  # the kernel chosen for this backend, dtype and sequence length
    from groupdiff_jax.models.group_attention import resolve_implementation
    attention_impl = resolve_implementation('auto', jnp.bfloat16 if compute_bytes == 2 else jnp.float32,
                                            backend=platform, length=keys)
  scores = H * keys if attention_impl == 'xla' else H
  full_block = L * (20 * C + scores) * compute_bytes
  if remat == 'full':
    return depth * L * C * 4 + full_block
  if remat == 'dots_saveable':
    return depth * L * (10 * C + scores) * compute_bytes
  return depth * full_block


# The HLO and its cost analysis are the same at any backend optimisation level; level 0 skips most of LLVM's code
# generation work: half the CPU compile time of an XL block (16.6 -> 8.9 CPU s on the 2-core dev host).
CHECK_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def lower_train_step(config, model, kind):
  """The jitted train step of `kind` lowered from abstract inputs (nothing is materialised)."""
  create = functools.partial(train_step_lib.create_train_state, model, config)
  abstract_state = jax.eval_shape(create, jax.random.PRNGKey(0))
  shape = (config.model.input_size, config.model.input_size, config.model.in_channels)
  batch = tuple({'images': jax.ShapeDtypeStruct((sub.num_images, *shape), jnp.float32),
                 'labels': jax.ShapeDtypeStruct((sub.num_images,), jnp.int32)} for sub in kind)
  step = functools.partial(train_step_lib.train_step, kind=kind, train_config=config.train, optim_config=config.optim,
                           max_group_size=config.model.max_group_size, null_class=config.model.num_classes,
                           model_config=config.model)
  return jax.jit(step).lower(abstract_state, batch)


def compiled_flops(lowered):
  """XLA's cost analysis (FLOPs) of the compiled program; None if unavailable."""
  try:
    try:
      compiled = lowered.compile(compiler_options=CHECK_COMPILER_OPTIONS)
    except Exception:  # pylint: disable=broad-except
      compiled = lowered.compile()  # a backend without that option
    cost = compiled.cost_analysis()
  except Exception as error:  # pylint: disable=broad-except
    logging.warning('No XLA cost analysis: %s', error)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def xla_step_flops(config, model, kind):
  """XLA's cost analysis of the compiled train step of `kind` (None if unavailable)."""
  return compiled_flops(lower_train_step(config, model, kind))


def _reduced(model_config, blocks, grouped):
  """A copy of the model config with `blocks` blocks, the first `grouped` of them with group attention, and plain
  XLA attention (flash kernels, loops and custom calls, hide their FLOPs from the cost analysis)."""
  reduced = model_config.copy_and_resolve_references()
  with reduced.unlocked():
    reduced.depth, reduced.group_layers, reduced.attention_impl = blocks, (0, grouped), 'xla'
  return reduced


def xla_image_flops(config, model_config, sub, images):
  """XLA's FLOPs of `images` more images in sub's groups: the step of 2 * images minus that of `images` (the
  step's FLOPs are linear in the images plus a constant, the optimizer's and EMA's); None if unavailable."""
  return _image_flops({None: (config, model_config)}, sub, images)[None]


def _image_flops(models, sub, images):
  """{name: xla_image_flops} of {name: (config, model config)}: the programs lowered one by one, then compiled
  side by side (the compiler releases the GIL: a core each)."""
  lowered = {}
  for name, (config, model_config) in models.items():
    step_config = config.copy_and_resolve_references()
    with step_config.unlocked():
      step_config.model = model_config
    model = model_from_config(model_config)
    for n in (images, 2 * images):
      lowered[name, n] = lower_train_step(step_config, model, (step_plan.SubBatch(n, sub.group_size,
                                                                                   sub.conditional),))
  with concurrent.futures.ThreadPoolExecutor(max(1, min(len(lowered), os.cpu_count() or 1))) as pool:
    flops = dict(zip(lowered, pool.map(compiled_flops, lowered.values())))
  return {name: None if None in (flops[name, images], flops[name, 2 * images]) else
          flops[name, 2 * images] - flops[name, images] for name in models}


def flop_check(config, max_check_images=None, log=logging.info):
  """The analytic FLOPs of `images` more images of the most-grouped step kind against XLA's cost analysis.

  XLA's count comes from depth-reduced copies of the model, extrapolated
  linearly in the blocks (the blocks are identical but for group attention):
  depth 1 and 2 with group attention give the per-block and the rest's
  FLOPs; where some blocks attend per image (model.group_layers), depth 2
  with one grouped block gives theirs. Two or three small models of two
  batch sizes compile in seconds where the full XL model takes minutes.
  """
  train = config.train
  kinds = step_plan.step_kinds(train.batch_size, train.group_size, train.group_ratio, train.mode, train.mixed_steps)
  name, kind = max(kinds.items(), key=lambda item: max(sub.group_size for sub in item[1]))
  sub = max(kind, key=lambda s: s.group_size)
  images = max_check_images or sub.group_size
  arch = arch_from_config(config.model)
  grouped = arch.num_group_layers() if sub.group_size > 1 else arch.depth
  if arch.depth <= 2:  # small enough to compile as it is
    full = xla_image_flops(config, _reduced(config.model, arch.depth, grouped), sub, images)
    return _check(name, images, sub, arch, full, {(arch.depth, grouped): full})
  shapes = [(1, 1), (2, 2)] + ([(2, 1)] if grouped < arch.depth else [])
  log('describe: FLOP check, compiling %d-block copies %s (blocks, of them with group attention) with %d and %d '
      'images ...', len(shapes), shapes, images, 2 * images)
  measured = _image_flops({shape: (config, _reduced(config.model, *shape)) for shape in shapes}, sub, images)
  xla = None
  if None not in measured.values():
    per_grouped_block = measured[2, 2] - measured[1, 1]
    per_plain_block = measured[2, 1] - measured[1, 1] if (2, 1) in measured else per_grouped_block
    rest = measured[1, 1] - per_grouped_block
    xla = rest + grouped * per_grouped_block + (arch.depth - grouped) * per_plain_block
  return _check(name, images, sub, arch, xla, measured)


def _check(name, images, sub, arch, xla, measured):
  analytic = step_flops(arch, (step_plan.SubBatch(images, sub.group_size, sub.conditional),), 'none')['model']
  return {'kind': name, 'images': images, 'group_size': sub.group_size, 'conditional': sub.conditional,
          'analytic_flops': analytic,
          'xla_flops': xla, 'ratio': (xla / analytic) if xla else None,
          'compiled': [{'blocks': b, 'grouped_blocks': g, 'xla_flops': f} for (b, g), f in measured.items()]}


def run(config, xla_check=True, out=print):
  """`--mode=describe`: the description (parameters, mesh, batch, memory) printed first, then the FLOP check."""
  out(format_description(describe(config, cost_analysis=False)))
  if xla_check:
    out(format_check(flop_check(config)))


def device_memory_bytes(mesh):
  """Memory of one device of `mesh` as its runtime reports it (bytes_limit), None where unknown (CPU,
  abstract devices: compile_job.py has the chip table)."""
  try:
    stats = mesh.devices.flat[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def describe(config, mesh=None, cost_analysis=True, max_check_images=None):
  """The description of `config` as a dict (see the module docstring)."""
  model = model_from_config(config.model)
  arch = arch_from_config(config.model)
  mesh = mesh if mesh is not None else sharding.config_mesh(config)
  train = config.train
  kinds = step_plan.step_kinds(train.batch_size, train.group_size, train.group_ratio, train.mode, train.mixed_steps)
  remat = config.model.remat

  abstract = jax.eval_shape(lambda key: train_step_lib.create_train_state(model, config, key), jax.random.PRNGKey(0))
  shardings = sharding.state_shardings_from_config(abstract, mesh, config.mesh)
  param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
  params_bytes = sharding.bytes_per_device(abstract.params, shardings.params)
  opt_bytes = sharding.bytes_per_device(abstract.opt_state, shardings.opt_state)
  ema_bytes = sharding.bytes_per_device(abstract.ema_params, shardings.ema_params)  # gradients: the same layout

  shards = sharding.num_batch_shards(mesh)
  processes = jax.process_count()
  compute_bytes = 2 if config.model.dtype == 'bfloat16' else 4
  impl = config.model.attention_impl
  platform = mesh.devices.flat[0].platform  # the target devices' kernels ('auto'), not the host's
  out = {
      'variant': config.model.variant,
      'param_count': param_count,
      'forward_flops_per_image': {n: forward_flops(arch, n)['total'] for n in sorted({1, train.group_size})},
      'mesh': dict(mesh.shape),
      'devices': mesh.size,
      'processes': processes,
      'group_ratio': train.group_ratio,
      'kinds': {},
  }
  for name, kind in kinds.items():
    flops = step_flops(arch, kind, remat)
    per_device_images = [sub.num_images // shards for sub in kind]
    activations = sum(n * activation_bytes_per_image(arch, sub.group_size, remat, compute_bytes, impl, platform)
                      for n, sub in zip(per_device_images, kind))
    out['kinds'][name] = {
        'sub_batches': [dataclasses.asdict(sub) | {'num_groups': sub.num_groups} for sub in kind],
        'global_images': sum(sub.num_images for sub in kind),
        'global_groups': sum(sub.num_groups for sub in kind),
        'per_host_images': sum(sub.num_images for sub in kind) // processes,
        'per_host_groups': sum(sub.num_groups for sub in kind) // processes,
        'per_device_images': sum(per_device_images),
        'model_flops': flops['model'],
        'hardware_flops': flops['hardware'],
        'activation_bytes_per_device': activations,
    }
  out['memory_bytes_per_device'] = {
      'params': params_bytes, 'ema_params': ema_bytes, 'opt_state': opt_bytes, 'grads': ema_bytes,
      'activations (largest kind)': max(k['activation_bytes_per_device'] for k in out['kinds'].values()),
  }
  if config.mesh is not None and config.mesh.shard_update:
    # The sharded update's params are slices; the model reads a copy gathered in the compute dtype.
    compute = jax.tree.map(sharding.compute_sharding, shardings.params)
    gathered = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(config.model.dtype)),
                            abstract.params)
    out['memory_bytes_per_device']['gathered params'] = sharding.bytes_per_device(gathered, compute)
  out['memory_bytes_per_device']['total'] = sum(out['memory_bytes_per_device'].values())
  out['device_memory_bytes'] = device_memory_bytes(mesh)

  if cost_analysis:
    out['xla_check'] = flop_check(config, max_check_images)
  return out


def _human(value, unit=''):
  for suffix, scale in (('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(value) >= scale:
      return f'{value / scale:.2f} {suffix}{unit}'
  return f'{value:.0f} {unit}'


def format_description(d):
  lines = [f"Model {d['variant']}: {d['param_count']:,} parameters."]
  for n, flops in d['forward_flops_per_image'].items():
    lines.append(f'Forward per image in a group of {n}: {_human(flops, "FLOPs")} ({_human(flops / 2, "MACs")}).')
  lines.append(f"Mesh {d['mesh']} on {d['devices']} device(s), {d['processes']} process(es); "
               f'batch split over {sharding.BATCH_AXES} (whole groups per data x fsdp shard).')
  for name, k in d['kinds'].items():
    parts = ', '.join(f"{s['num_groups']} groups of {s['group_size']} ({'cond' if s['conditional'] else 'uncond'})"
                      for s in k['sub_batches'])
    lines.append(f"Step kind '{name}': {parts}; global {k['global_images']} images / {k['global_groups']} groups, "
                 f"per host {k['per_host_images']} / {k['per_host_groups']}, per device {k['per_device_images']} "
                 f"images; {_human(k['model_flops'], 'FLOPs')} per step (model; hardware with remat "
                 f"{_human(k['hardware_flops'], 'FLOPs')}).")
  lines.append('Per-device memory (estimate): ' + ', '.join(
      f'{k} {_human(v, "B")}' for k, v in d['memory_bytes_per_device'].items()))
  limit = d.get('device_memory_bytes')
  if limit and d['memory_bytes_per_device']['total'] > limit:
    lines.append(f"WARNING: the estimated {_human(d['memory_bytes_per_device']['total'], 'B')} per device exceeds "
                 f"the {_human(limit, 'B')} of these devices; use --config.mesh.fsdp, --config.model.remat or a "
                 'smaller --config.train.batch_size (check with --mode=compile for TPU pods).')
  lines.append('Activations are a rough estimate: the TPU compiler\'s temporaries (--mode=compile) can differ '
               'by more than 25% (it fuses and rematerialises; e.g. 12.9 GB compiled vs 20.0 GB estimated for a '
               '4-block width-512 model at 1024 images per v5e device). With mesh.fsdp > 1 they also hold the '
               'gathered full-size parameters of the layers in flight, which this estimate leaves out (SiT-XL/2 '
               'on v5p-64 with fsdp=8: 3.86 GiB compiled vs 2.78 GiB estimated; docs/scaling.md).')
  if d.get('xla_check'):
    lines.append(format_check(d['xla_check']))
  return '\n'.join(lines)


def format_check(check):
  if not check['xla_flops']:
    return 'XLA cost analysis: not available on this backend.'
  return (f"XLA cost analysis, {check['images']} more images in groups of {check['group_size']} (depth-reduced copies "
          f"extrapolated to the full depth): {_human(check['xla_flops'], 'FLOPs')} vs analytic "
          f"{_human(check['analytic_flops'], 'FLOPs')} (ratio {check['ratio']:.3f}; XLA also counts element-wise ops).")
