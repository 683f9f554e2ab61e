"""`--mode=compile`: the pod's programs compiled for an abstract TPU topology (or GPUs) from any host.

  python -m groupdiff_jax.main --config=configs/sit_xl.py --workdir=DIR --mode=compile \
      --config.compile.topology=v5p:2x2x2

`--config.compile.topology=h100:8` (or h100:4x8, h200:8) compiles the same programs with XLA's GPU compiler
for compile-only CUDA devices instead (gpu_topology.py; `pip install -e '.[gpu-compile]'`): memory, fit and
collectives as below, cuDNN attention for `attention_impl=auto` in bf16, but no step-time estimate (no cost
analysis without a device).

Builds abstract TPU devices (`jax.experimental.topologies.get_topology_desc`,
libtpu: `pip install -e '.[tpu]'`), the config's (data, fsdp) mesh over them
(sharding.make_mesh; `dcn_*` axes span `compile.num_slices` slices) and,
from abstract inputs only (ShapeDtypeStructs with NamedShardings; nothing
materialised), lowers and compiles the very jitted programs a pod runs: the
train step of every step kind (train_step.make_jitted_train_step) and the
sample job's sampling call (sample.make_sampler on one process's devices).
Kernels are chosen for the target devices (group_attention.target_platform),
so splash attention is a Mosaic kernel (`tpu_custom_call`).
A config that describe's estimate puts far over HBM (`compile.precheck_ratio`)
is refused before anything is lowered (precheck).

Per program, DIR/compile_report.json holds: memory_analysis() bytes per
device, the chip's HBM and a fit verdict with `compile.headroom`; describe's
analytic estimate beside it; cost_analysis() FLOPs against the analytic
count; the compiler's `optimal_seconds` and the MFU it implies (a compiler
estimate, never a measurement); collectives of the optimized HLO (count,
result bytes); Mosaic kernels; compile time. The programs are lowered one by
one, then compiled side by side (`compile.workers` threads: the compiler
releases the GIL), so with a core per program the job takes about the longest
compile, not the sum (with fewer cores, each program's `compile_seconds`
includes the time it shared its core).

Mosaic kernels are opaque to the cost analysis (no FLOPs, ~ns). The estimate
adds the analytic attention FLOPs of the step (forward + backward, per
device) at the chip's bf16 peak to `optimal_seconds`: an optimistic bound on
the attention kernels' time, stated in the report as `attention_model`.
"""

import concurrent.futures
import contextlib
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
from absl import logging

from groupdiff_jax import describe as describe_lib
from groupdiff_jax import errors, gpu_topology, sample, sharding, step_breakdown, step_plan, storage
from groupdiff_jax import train_step as train_step_lib
from groupdiff_jax.compile_target import target_devices
from groupdiff_jax.compiled_stats import COLLECTIVE_BYTES_RULE, analyse
from groupdiff_jax.models.dit import model_from_config
from groupdiff_jax.tpu_topology import target_mesh, with_shardings

ROOFLINE_MODEL = ('max(compiler FLOPs / bf16 peak, compiler bytes accessed / HBM bandwidth) + collective bytes '
                  '(an all-reduce twice: a reduce-scatter and an all-gather) / one-way ICI bandwidth (collectives '
                  'not overlapped) + analytic attention FLOPs / peak (Mosaic kernels); per device; chip figures '
                  'from cloud.google.com/tpu/docs (tpu_topology.CHIPS)')


def roofline(result, chip, attention_flops):
  """Seconds per step by ROOFLINE_MODEL from a program's analysis, and its parts (an estimate, not a
  measurement: no overlap of collectives with compute, every byte accessed at full HBM bandwidth)."""
  parts = {'compute': result['compiler_flops_per_device'] / chip['bf16_flops'],
           'memory': result['compiler_bytes_accessed_per_device'] / chip['hbm_bandwidth'],
           'collectives': sum(c['bytes'] * (2 if op == 'all-reduce' else 1)
                              for op, c in result['collectives'].items()) / chip['ici_bandwidth'],
           'attention': attention_flops / chip['bf16_flops']}
  return max(parts['compute'], parts['memory']) + parts['collectives'] + parts['attention'], parts

ADVICE = ('shard parameters/optimizer state over more devices (--config.mesh.fsdp=... with --config.mesh.data=-1), '
          'rematerialise activations (--config.model.remat=dots_saveable or full), or a smaller global batch '
          '(--config.train.batch_size)')


class DoesNotFit(errors.ConfigError):
  """The TPU compiler refused a program: it needs more HBM than a device has."""

  def __init__(self, message, compiler_message, compile_seconds):
    super().__init__(message)
    self.compiler_message = compiler_message
    self.compile_seconds = compile_seconds


def _compile(lowered, name, topology='', compiler_options=None):
  """lowered.compile(); the TPU compiler's out-of-HBM refusal becomes DoesNotFit with its numbers."""
  logging.info('compiling %s ...', name)
  start = time.perf_counter()
  try:
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if 'RESOURCE_EXHAUSTED' not in str(error):
      raise
    message = str(error).split('RESOURCE_EXHAUSTED:', 1)[-1].strip().splitlines()[0]
    raise DoesNotFit(f'{name} does not fit {topology} per device (the TPU compiler: {message}); {ADVICE}.',
                     message, time.perf_counter() - start) from error
  seconds = time.perf_counter() - start
  logging.info('compiled %s in %.1f s', name, seconds)
  return compiled, seconds


def _refused(error):
  """The report entry of a program the compiler refused for lack of HBM."""
  return {'fits': False, 'compiler_refused': error.compiler_message, 'compile_seconds': error.compile_seconds}


def selected_kinds(kinds, names):
  """The step kinds named in `names` ('singles,groups'; '' = all), in the run's order."""
  wanted = [n.strip() for n in names.split(',') if n.strip()] if isinstance(names, str) else list(names)
  unknown = sorted(set(wanted) - set(kinds))
  if unknown:
    raise errors.ConfigError(f'compile.step_kinds={names!r} names {unknown}, which this config does not run; its '
                             f'step kinds are {list(kinds)} (or leave compile.step_kinds empty for all).')
  return {name: kind for name, kind in kinds.items() if not wanted or name in wanted}


# --- The job ------------------------------------------------------------------
def compile_report(config, include_sampler=True, keep_going=False, hlo_sink=None):
  """Compiles the train steps (and the sampler) for config.compile's topology; returns the report dict.

  keep_going: a program the compiler refuses for lack of HBM is recorded
  (`compiler_refused`, fits False) and the next one compiled; else DoesNotFit.
  hlo_sink: None, or called with (program name, optimized HLO text) for each compiled program.
  """
  cc = config.compile
  devices, chip, compiler_options = target_devices(cc)
  mesh = target_mesh(config, devices, cc.num_slices)
  train = config.train
  kinds = step_plan.step_kinds(train.batch_size, train.group_size, train.group_ratio, train.mode, train.mixed_steps)
  kinds = selected_kinds(kinds, cc.step_kinds)
  for kind in kinds.values():
    try:
      sharding.check_groups_fit_mesh(kind, mesh)
    except ValueError as error:
      raise errors.ConfigError(f'train.batch_size={train.batch_size} on {mesh.size} devices of {cc.topology}: '
                               f'{error}') from error
  model = model_from_config(config.model)
  abstract = jax.eval_shape(lambda key: train_step_lib.create_train_state(model, config, key), jax.random.PRNGKey(0))
  state_sharding = sharding.state_shardings_from_config(abstract, mesh, config.mesh)
  state = with_shardings(abstract, state_sharding)
  batch_sharding = sharding.batch_sharding(mesh)
  side, channels = config.model.input_size, config.model.in_channels
  estimate = describe_lib.describe(config, mesh=mesh, cost_analysis=False)
  arch = describe_lib.arch_from_config(config.model)
  shards = sharding.num_batch_shards(mesh)
  budget = (1.0 - cc.headroom) * chip['hbm_bytes']
  precheck(config, estimate, budget, chip, mesh)
  report = {'topology': cc.topology, 'num_slices': cc.num_slices, 'devices': mesh.size, 'mesh': dict(mesh.shape),
            'device_kind': devices[0].device_kind, 'chip': dict(chip), 'headroom': cc.headroom,
            'attention_impl': config.model.attention_impl, 'remat': config.model.remat,
            'batch_size': train.batch_size,
            'attention_model': 'optimal_seconds + analytic attention FLOPs (fwd+bwd) at the chip bf16 peak '
                               '(Mosaic kernels are invisible to cost_analysis)',
            'describe_estimate_bytes_per_device': estimate['memory_bytes_per_device'],
            'collective_bytes': COLLECTIVE_BYTES_RULE, 'roofline_model': ROOFLINE_MODEL,
            'shard_update': bool(config.mesh.shard_update),
            'group_collective': config.mesh.group_collective, 'programs': {}}
  step = train_step_lib.make_jitted_train_step(config, mesh, state_sharding)

  def batch_of(kind):
    return tuple({'images': jax.ShapeDtypeStruct((sub.num_images, side, side, channels), jnp.float32,
                                                 sharding=batch_sharding),
                  'labels': jax.ShapeDtypeStruct((sub.num_images,), jnp.int32, sharding=batch_sharding)}
                 for sub in kind)

  programs = [(f'train_step/{name}', functools.partial(step.lower, state, batch_of(kind), kind))
              for name, kind in kinds.items()]
  breakdown = next(iter(kinds)) if cc.breakdown else None
  if breakdown:  # the first step kind's forward, forward at 2x the batch, forward + backward (step_breakdown.py)
    programs += step_breakdown.programs(config, mesh, state, state_sharding, breakdown, kinds[breakdown], batch_of)
  if include_sampler:
    sampler_lower, sampler_devices, sampler_images = _sampler_lowering(config, model, abstract, devices)
    programs.append(('sample', sampler_lower))
  start = time.perf_counter()
  outcomes = compile_all(programs, cc.topology, cc.workers, compiler_options)
  report['compile_wall_seconds'] = time.perf_counter() - start
  texts = {name: outcome[0].as_text() for name, outcome in outcomes.items() if not isinstance(outcome, DoesNotFit)}
  if hlo_sink is not None:
    for name, text in texts.items():
      hlo_sink(name, text)
  for name, kind in kinds.items():
    outcome = outcomes[f'train_step/{name}']
    if isinstance(outcome, DoesNotFit):
      if not keep_going:
        raise outcome
      report['programs'][f'train_step/{name}'] = _refused(outcome)
      continue
    result = analyse(*outcome, text=texts[f'train_step/{name}'])
    flops = describe_lib.step_flops(arch, kind, config.model.remat)
    attention = sum(sub.num_images * 3 * describe_lib.forward_flops(arch, sub.group_size)['attention']
                    for sub in kind) / mesh.size
    # libtpu 0.0.42 can report a negative optimal_seconds (no estimate): then none is given.
    optimal = result['compiler_optimal_seconds']
    seconds_estimate = optimal + attention / chip['bf16_flops'] if optimal > 0 else None
    # A compile for GPUs without one gives no cost analysis (no FLOPs, no bytes): no roofline then.
    costed = result['compiler_flops_per_device'] > 0 or result['compiler_bytes_accessed_per_device'] > 0
    roof, roof_parts = roofline(result, chip, attention) if costed else (None, None)
    result.update({
        'roofline_seconds (estimate)': roof, 'roofline_parts_seconds': roof_parts,
        'mfu (roofline estimate)': (flops['model'] / mesh.size) / (roof * chip['bf16_flops']) if roof else None,
        'kind': [list(map(str, (s.num_images, s.group_size, s.conditional))) for s in kind],
        'analytic_model_flops_per_device': flops['model'] / mesh.size,
        'analytic_attention_flops_per_device': attention,
        'estimated_step_seconds (compiler estimate)': seconds_estimate,
        'mfu (compiler estimate)': (flops['model'] / mesh.size) / (seconds_estimate * chip['bf16_flops'])
                                   if seconds_estimate else None,
        'describe_activation_bytes_per_device': estimate['kinds'][name]['activation_bytes_per_device'],
        'per_device_images': sum(s.num_images for s in kind) // shards,
    })
    _verdict(result, chip, budget)
    report['programs'][f'train_step/{name}'] = result
  for name, _ in programs:
    if name.startswith('forward'):
      outcome = outcomes[name]
      refused = isinstance(outcome, DoesNotFit)
      report['programs'][name] = _refused(outcome) if refused else analyse(*outcome, text=texts[name])
      if 'compiler_refused' not in report['programs'][name]:
        _verdict(report['programs'][name], chip, budget)
  if breakdown and all('compiler_refused' not in p for p in report['programs'].values()):
    report['hbm_breakdown'] = {'kind': breakdown, 'parts': step_breakdown.parts(report['programs'], breakdown, chip)}
  if include_sampler:
    outcome = outcomes['sample']
    if isinstance(outcome, DoesNotFit):
      if not keep_going:
        raise outcome
      report['programs']['sample'] = _refused(outcome)
    else:
      result = analyse(*outcome, text=texts['sample'])
      result.update({'devices': sampler_devices, 'images_per_call': sampler_images})
      _verdict(result, chip, budget)
      report['programs']['sample'] = result
  # The breakdown's extra programs (forward at 2x the batch) do not run in training: not part of the verdict.
  report['fits'] = all(p['fits'] for name, p in report['programs'].items() if not name.startswith('forward'))
  report['batch_local_attention'] = _attention_is_local(report, mesh)
  return report


def compile_all(programs, topology, workers=0, compiler_options=None):
  """Lowers each (name, lower_fn) in turn, then compiles them side by side; {name: (compiled, s) | DoesNotFit}.

  The TPU compiler releases the GIL, so `workers` threads (0: one per CPU
  core, at most one per program) compile concurrently; host memory grows
  with them (compile.workers=1 compiles one at a time).
  """
  lowered = []
  for name, lower_fn in programs:
    logging.info('lowering %s ...', name)
    lowered.append((name, lower_fn()))
  workers = workers or os.cpu_count() or 1

  def one(item):
    name, low = item
    try:
      return name, _compile(low, name, topology, compiler_options)
    except DoesNotFit as error:
      return name, error

  with without_persistent_cache(), concurrent.futures.ThreadPoolExecutor(
      max_workers=max(1, min(workers, len(lowered)))) as pool:
    return dict(pool.map(one, lowered))


@contextlib.contextmanager
def without_persistent_cache():
  """JAX's persistent compilation cache off while compiling for abstract devices: their executables cannot
  be read back on this host (a user's JAX_COMPILATION_CACHE_DIR would log a failed read per program)."""
  from jax.experimental.compilation_cache import compilation_cache
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', enabled)
    compilation_cache.reset_cache()


def _sampler_lowering(config, model, abstract, devices):
  """(lower_fn, devices, images per call) of the sample job's jitted call on one process's devices.

  The mesh is sample.local_mesh over the first process's devices; the
  inputs are abstract (EMA params replicated, labels batch-sharded).
  """
  local = [d for d in devices if d.process_index == devices[0].process_index]
  mesh = sample.local_mesh(config.sample.groups_per_batch, local)
  sampler = sample.make_sampler(model, config.sample, config.model, mesh, config.mesh)
  params = with_shardings(abstract.ema_params, jax.tree.map(lambda _: sharding.replicated(mesh), abstract.ema_params))
  images = config.sample.groups_per_batch * config.sample.images_per_group
  labels = jax.ShapeDtypeStruct((images,), jnp.int32, sharding=sharding.batch_sharding(mesh))
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  return functools.partial(sampler.lower, params, labels, rng), mesh.size, images


def _verdict(result, chip, budget):
  peak = result['memory_bytes_per_device']['peak']
  result['hbm_bytes'] = chip['hbm_bytes']
  result['fits'] = bool(peak <= budget)


def _attention_is_local(report, mesh):
  """With fsdp=1 every parameter is replicated, so a batch-sharded step needs only gradient all-reduces: any
  all-gather / all-to-all / collective-permute would move activations (e.g. a batch gathered around attention)."""
  if mesh.shape[sharding.FSDP_AXIS] != 1 or mesh.shape.get(sharding.GROUP_AXIS, 1) != 1 or report['shard_update']:
    return None  # parameter / key-value all-gathers are expected; not decided from the HLO here
  moving = ('all-gather', 'all-to-all', 'collective-permute')
  return all(p['collectives'][op]['count'] == 0 for name, p in report['programs'].items()
             if name.startswith('train_step/') and 'collectives' in p for op in moving)


def _opt(value, spec):
  return 'n/a' if value is None else format(value, spec)


def _gib(value):
  return f'{value / 2**30:.2f}G'


def format_report(report):
  lines = [f"{report['topology']} x{report['num_slices']} ({report['device_kind']}, {report['devices']} devices, "
           f"mesh {report['mesh']}), batch {report['batch_size']}, attention {report['attention_impl']}, "
           f"remat {report['remat']}, HBM {_gib(report['chip']['hbm_bytes'])}/device, "
           f"headroom {report['headroom']:.0%}",
           'describe estimate per device: ' + ', '.join(
               f'{k} {_gib(v)}' for k, v in report['describe_estimate_bytes_per_device'].items())]
  head = (f"{'program':<28}{'args':>8}{'out':>8}{'temp':>8}{'alias':>8}{'peak':>8} {'fits':<5}{'TFLOP':>7}"
          f"{'anaTF':>7}{'est s':>8}{'MFU*':>6}{'roof s':>8}{'MFUr':>6}{'mosaic':>7}{'comp s':>7}  collectives "
          "(count/GiB)")
  lines.append(head)
  for name, p in report['programs'].items():
    if 'compiler_refused' in p:
      lines.append(f"{name:<28}does not fit: {p['compiler_refused']} ({p['compile_seconds']:.0f} s)")
      continue
    m = p['memory_bytes_per_device']
    coll = ' '.join(f"{op}:{c['count']}/{c['bytes'] / 2**30:.2f}" for op, c in p['collectives'].items()
                    if c['count'])
    est = p.get('estimated_step_seconds (compiler estimate)')
    mfu = p.get('mfu (compiler estimate)')
    analytic = p.get('analytic_model_flops_per_device')
    lines.append(f"{name:<28}{_gib(m['argument']):>8}{_gib(m['output']):>8}{_gib(m['temp']):>8}"
                 f"{_gib(m['alias']):>8}{_gib(m['peak']):>8} {str(p['fits']):<5}"
                 f"{p['compiler_flops_per_device'] / 1e12:>7.2f}"
                 f"{(analytic or 0) / 1e12:>7.2f}{_opt(est, '.3f'):>8}{_opt(mfu, '.0%'):>6}"
                 f"{_opt(p.get('roofline_seconds (estimate)'), '.3f'):>8}{_opt(p.get('mfu (roofline estimate)'), '.0%'):>6}"
                 f"{p['mosaic_kernels']:>7}"
                 f"{p['compile_seconds']:>7.0f}  {coll or '-'}")
  if 'hbm_breakdown' in report:
    parts = report['hbm_breakdown']['parts'].items()
    lines.append(f"HBM bytes accessed per device by part (train_step/{report['hbm_breakdown']['kind']}; "
                 'step_breakdown.py): ' + ', '.join(
                     f"{part} {p['bytes'] / 1e9:.2f} GB ({p['hbm_seconds'] * 1e3:.1f} ms)" for part, p in parts))
  if gpu_topology.parse(report['topology']):
    estimates = ('no step-time estimate: compiled for GPUs without one, XLA gives no cost analysis (no FLOPs, '
                 'no bytes accessed; anaTF is the analytic count). GEMMs compiled to cuBLAS '
                 '(gpu_topology.COMPILER_OPTIONS).')
  else:
    estimates = ('MFU*, est s: compiler estimates (cost_analysis optimal_seconds + attention at peak); roof s, MFUr: '
                 'roofline estimate (' + report.get('roofline_model', ROOFLINE_MODEL) + '); neither is a '
                 'measurement.')
  lines.append(estimates + ' Attention without collectives (batch-sharded, fsdp=1): '
               f"{report['batch_local_attention']}. Fits: {report['fits']}. Lowered and compiled in "
               f"{report.get('compile_wall_seconds', 0):.0f} s (programs side by side, compile.workers).")
  return '\n'.join(lines)


def _advice(state_bytes, budget, mesh_shape, devices, remat):
  """The changes that could make a step fit: fsdp when the state matters, remat when off, a smaller batch."""
  advice = []
  if mesh_shape.get(sharding.FSDP_AXIS, 1) < devices and state_bytes > 0.3 * budget:
    advice.append('shard parameters/optimizer state over more devices (--config.mesh.fsdp=... with '
                  '--config.mesh.data=-1)')
  if remat == 'none':
    advice.append('rematerialise activations (--config.model.remat=dots_saveable or full)')
  advice.append('or a smaller global batch (--config.train.batch_size)')
  return advice


def precheck(config, estimate, budget, chip, mesh):
  """ConfigError, before anything is lowered, when describe's estimate is far over the budget.

  Far: over compile.precheck_ratio x budget for some step kind (0 turns the
  check off). Across the fit table's compiled steps describe's estimate was
  0.74-1.13x the compiler's peak, so a 2x margin refuses only configs that
  cannot fit; closer calls go to the compiler.
  """
  ratio = config.compile.precheck_ratio
  if not ratio:
    return
  memory = estimate['memory_bytes_per_device']
  if memory['total'] <= ratio * budget:  # total: the state + the largest step kind's activations
    return
  activations = memory['activations (largest kind)']
  state = memory['total'] - activations
  name, kind = max(estimate['kinds'].items(), key=lambda item: item[1]['activation_bytes_per_device'])
  cc, remat = config.compile, config.model.remat
  advice = _advice(state, budget, dict(mesh.shape), mesh.size, remat)
  raise errors.ConfigError(
      f'{config.model.variant} at train.batch_size={config.train.batch_size} on {mesh.size} devices of '
      f'{cc.topology} (mesh {dict(mesh.shape)}, remat={remat}): describe estimates {_gib(state + activations)} per '
      f'device for train_step/{name} (state {_gib(state)}, activations {_gib(activations)} for '
      f'{kind["per_device_images"]} images per device), over {ratio:g}x the {_gib(budget)} a device has with '
      f'{cc.headroom:.0%} headroom ({_gib(chip["hbm_bytes"])} HBM): not compiled. To fit: ' +
      '; '.join(advice) + ' (--config.compile.precheck_ratio=0 compiles it anyway).')


def fit_advice(report):
  """What would make a config that does not fit fit, from the report."""
  budget = (1 - report['headroom']) * report['chip']['hbm_bytes']
  refused = [(name, p) for name, p in report['programs'].items() if 'compiler_refused' in p]
  compiled = [(name, p) for name, p in report['programs'].items() if 'compiler_refused' not in p]
  if refused:
    name, p = refused[0]
    need = f'{name} was refused by the TPU compiler ({p["compiler_refused"]})'
    # The state's bytes from a train step that compiled; none did: unknown, so fsdp stays in the advice.
    argument = max((p['memory_bytes_per_device']['argument'] for n, p in compiled if n.startswith('train_step/')),
                   default=budget)
  else:
    name, p = max(compiled, key=lambda item: item[1]['memory_bytes_per_device']['peak'])
    m = p['memory_bytes_per_device']
    need = (f'{name} needs {_gib(m["peak"])} per device (arguments {_gib(m["argument"])}, temporaries '
            f'{_gib(m["temp"])})')
    argument = m['argument']
  advice = _advice(argument, budget, report['mesh'], report['devices'], report['remat'])
  return (f'{need} but a {report["topology"]} chip has {_gib(report["chip"]["hbm_bytes"])} HBM '
          f'({_gib(budget)} with {report["headroom"]:.0%} headroom); ' + '; '.join(advice) + '.')


def run(config, workdir):
  """The job: compile, write DIR/compile_report.json, print the table; ConfigError if it does not fit."""
  def save_hlo(name, text):
    storage.write_atomically(storage.path(workdir) / 'hlo' / (name.replace('/', '_') + '.txt'),
                             lambda f: f.write(text.encode()))

  report = compile_report(config, include_sampler=config.compile.sampler, keep_going=True,
                          hlo_sink=save_hlo if config.compile.save_hlo else None)
  path = storage.path(workdir) / 'compile_report.json'
  # Atomic: a cut-short write never looks like a report (fit_table skips reports).
  storage.write_atomically(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
  print(format_report(report))  # the job's final output
  print(f'Report: {path}')
  if not report['fits']:
    raise errors.ConfigError('The config does not fit with the headroom: ' + fit_advice(report))
  return report
