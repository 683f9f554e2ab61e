"""CPU benchmark: the full jitted train step vs the fp32 matmul peak measured beside it, and where its time goes.

  JAX_PLATFORMS=cpu python benchmarks/cpu_train_step.py [--images=16 --group_sizes=1,4 --repeats=5]
      [--depth=12 --hidden_size=384 --num_heads=6 --patch_size=2 --input_size=32] [--attention_impl=auto]
      [--profile_dir=/tmp/cpu_train_step_trace] [--no_profile] [--reference=/path/to/another/checkout]

Times the repository's own `train_step.train_step` (jitted as `describe`
does, state donated), SiT-S/2-sized by default (depth 12, width 384, 6
heads, 256 tokens per image, no learned sigma, sample embedding of 4), fp32,
AdamW with clipping, EMA and the non-finite guard, on `--images` images per
step: singles (group size 1, labels kept) and unconditional groups of each
other size in `--group_sizes`. With `--reference=DIR` (a checkout of the
repository, e.g. main's), the same steps built from DIR's code are timed in
the same rounds, interleaved with this checkout's ("ref" rows): a change is
compared side by side, in one process, under the same load. In the same process, interleaved with the
steps (one step of each kind, then each matmul, per round), it times a fp32
`jnp.dot` of each of the model's own dense shapes ([images*tokens, C] x
[C, 3C], [C, C], [C, 4C] and [images*tokens, 4C] x [4C, C]); the peak of a
round is the best of them, and each step's "% of peak" is its rate over the
peak of its own round (min / median over rounds), so the ratio holds on a
machine shared with other jobs where absolute rates do not.

FLOPs: 3 x the forward matmul FLOPs of `describe.forward_flops` (dense
layers, patch embedding and attention's Q.K^T and P.V; a multiply-add is 2),
as the issue and docs/benchmarks.md count them; element-wise work is not
counted.

Breakdown: one more step of each kind under `jax.profiler.trace` (XLA's CPU
runtime names one trace event per executed op, as in the compiled HLO). Each
op is put in one class from its HLO opcode, the ops fused into it and the
`op_name` metadata (the Flax module path; `jvp(` marks the loss and its
gradient, so ops without it are the optimizer, EMA and guard). The times are
the summed durations of the leaf ops of the traced step (containers such as
`while` are not counted twice); tracing adds its own cost, so the traced
step is slower than the timed one, and ops of the two cores may overlap.
"""

import argparse
import collections
import functools
import glob
import gzip
import importlib
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402
from groupdiff_jax import describe, step_plan  # noqa: E402
from groupdiff_jax import train_step as train_step_lib  # noqa: E402
from groupdiff_jax.models.dit import model_from_config  # noqa: E402

# Ops that only move data (a fusion of nothing else is a copy/transpose).
DATA_MOVEMENT = {'parameter', 'constant', 'bitcast', 'copy', 'transpose', 'reshape', 'broadcast', 'pad', 'slice',
                 'dynamic-slice', 'dynamic-update-slice', 'concatenate', 'tuple', 'get-tuple-element', 'iota',
                 'bitcast-convert', 'copy-start', 'copy-done'}
CONTAINERS = {'while', 'call', 'conditional'}
MATMUL_OPS = {'dot', 'convolution'}
CLASSES = ('dense matmuls (qkv, proj, MLP, adaLN, patch, final)', 'attention matmuls (QK^T, PV and their grads)',
           'attention softmax / other', 'norm, modulation, GELU, residual, bias-grad fusions',
           'copies / transposes', 'optimizer + EMA + non-finite guard', 'loss, noise, other')


def import_reference(root):
  """{'train_step', 'dit', 'default'}: those modules of the checkout at `root`, imported beside this one's.

  This checkout's `groupdiff_jax` and `configs` modules are set aside while
  DIR's are imported, then put back; DIR's stay alive through the returned
  modules (which hold their own imports) under names prefixed 'reference.'.
  """
  ours = lambda name: name.split('.')[0] in ('groupdiff_jax', 'configs')
  saved = {name: module for name, module in sys.modules.items() if ours(name)}
  for name in saved:
    del sys.modules[name]
  sys.path.insert(0, os.path.abspath(root))
  try:
    modules = {key: importlib.import_module(name) for key, name in (
        ('train_step', 'groupdiff_jax.train_step'), ('dit', 'groupdiff_jax.models.dit'), ('default', 'configs.default'))}
  finally:
    sys.path.remove(os.path.abspath(root))
    for name in [name for name in sys.modules if ours(name)]:
      sys.modules['reference.' + name] = sys.modules.pop(name)
    sys.modules.update(saved)
  if os.path.samefile(os.path.dirname(modules['dit'].__file__), os.path.dirname(model_from_config.__code__.co_filename)):
    raise SystemExit(f'--reference={root} imported this checkout\'s code again')
  return modules


def make_config(args, default=default):
  config = default.get_config()
  config.model.variant = f'SiT-S/{args.patch_size}'
  config.model.depth, config.model.hidden_size, config.model.num_heads = args.depth, args.hidden_size, args.num_heads
  config.model.input_size, config.model.in_channels = args.input_size, 4
  config.model.learn_sigma = False
  config.model.attention_impl = args.attention_impl
  config.model.max_group_size = max(4, *args.group_sizes)
  config.train.batch_size = args.images
  return config


def step_kind(images, group_size):
  """Singles (labels kept) or unconditional groups of `group_size` (GroupDiff-l's two step kinds)."""
  return (step_plan.SubBatch(images, group_size, group_size == 1),)


def make_step(config, kind, train_step_lib=train_step_lib):
  step = functools.partial(train_step_lib.train_step, kind=kind, train_config=config.train,
                           optim_config=config.optim, max_group_size=config.model.max_group_size,
                           null_class=config.model.num_classes, model_config=config.model)
  return jax.jit(step, donate_argnums=0)


def make_batch(config, images, seed):
  shape = (images, config.model.input_size, config.model.input_size, config.model.in_channels)
  rng = np.random.default_rng(seed)
  return ({'images': jnp.asarray(rng.standard_normal(shape, np.float32)),
           'labels': jnp.asarray(rng.integers(0, config.model.num_classes, images, np.int32))},)


CPU_SECONDS = collections.defaultdict(list)  # label -> process CPU seconds of each timed call


def timed(fn, *args, label=None):
  """(wall seconds, result) of fn(*args); with a label, also records its process CPU seconds."""
  start, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn(*args))
  if label is not None:
    CPU_SECONDS[label].append(time.process_time() - cpu)
  return time.perf_counter() - start, out


def matmul_shapes(tokens, width):
  """(M, K, N) of the blocks' dense layers (qkv, proj, fc1, fc2) on `tokens` tokens."""
  return [(tokens, width, 3 * width), (tokens, width, width), (tokens, width, 4 * width), (tokens, 4 * width, width)]


# ----------------------------------------------------------------------------------------------- breakdown


def parse_hlo(text):
  """Compiled HLO text -> {instruction: (opcode, op_name, called computation)}, {computation: [opcodes]}."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$', line)
    if head and not line.startswith(' '):
      current = head.group(1)
      continue
    match = re.match(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$', line)
    if not match or current is None:
      continue
    name, rest = match.groups()
    opcode = re.search(r'(?:^|\s)([a-z][a-z0-9\-]*)\(', rest)
    opcode = opcode.group(1) if opcode else '?'
    op_name = re.search(r'op_name="([^"]*)"', rest)
    called = re.search(r'calls=%?([\w.\-]+)', rest)
    instructions[name] = (opcode, op_name.group(1) if op_name else '', called.group(1) if called else None)
    computations[current].append(opcode)
  return instructions, computations


def classify(name, instructions, computations):
  """One of CLASSES for the executed op `name`; None for containers and ops not in the module."""
  if name not in instructions:
    return None
  opcode, op_name, called = instructions[name]
  if opcode in CONTAINERS:
    return None
  inner = set(computations.get(called, ())) if opcode == 'fusion' else {opcode}
  if 'jvp(' not in op_name:
    return CLASSES[5]
  if inner <= DATA_MOVEMENT:
    return CLASSES[4]
  has_matmul = bool(inner & MATMUL_OPS) or '_fusion' in name and ('ynn' in name or 'xnn' in name)
  in_attention = '/attn/' in op_name and not re.search(r'/attn/(qkv|proj)/', op_name)
  if in_attention:
    return CLASSES[1] if has_matmul else CLASSES[2]
  if has_matmul:
    return CLASSES[0]
  if 'DiT' in op_name:
    return CLASSES[3]
  return CLASSES[6]


def trace_events(trace_dir):
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True), key=os.path.getmtime)
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  return [e for e in events if e.get('ph') == 'X']


def breakdown(step, state, batch, trace_dir):
  """(new state, {class: seconds}, summed op seconds, traced step seconds, top ops) of one traced step."""
  instructions, computations = parse_hlo(step.lower(state, batch).compile().as_text())
  os.makedirs(trace_dir, exist_ok=True)
  run_dir = tempfile.mkdtemp(dir=trace_dir)
  jax.profiler.start_trace(run_dir, create_perfetto_trace=True)
  seconds, (state, _) = timed(step, state, batch)
  jax.profiler.stop_trace()
  by_class, by_op = collections.Counter(), collections.Counter()
  for event in trace_events(run_dir):
    cls = classify(event['name'], instructions, computations)
    if cls is not None:
      by_class[cls] += event.get('dur', 0) * 1e-6
      by_op[(event['name'], cls, instructions[event['name']][1])] += event.get('dur', 0) * 1e-6
  return state, by_class, sum(by_class.values()), seconds, by_op.most_common(12)


# ----------------------------------------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=16)
  parser.add_argument('--group_sizes', default='1,4', help='comma-separated; 1 = singles, N > 1 = groups of N')
  parser.add_argument('--repeats', type=int, default=5, help='interleaved rounds (one step of each kind per round)')
  parser.add_argument('--depth', type=int, default=12)
  parser.add_argument('--hidden_size', type=int, default=384)
  parser.add_argument('--num_heads', type=int, default=6)
  parser.add_argument('--patch_size', type=int, default=2)
  parser.add_argument('--input_size', type=int, default=32)
  parser.add_argument('--attention_impl', default='auto')
  parser.add_argument('--profile_dir', default=os.path.join(tempfile.gettempdir(), 'cpu_train_step_trace'))
  parser.add_argument('--no_profile', action='store_true')
  parser.add_argument('--reference', default='', help='another checkout of the repository, timed beside this one')
  args = parser.parse_args()
  args.group_sizes = [int(n) for n in args.group_sizes.split(',')]
  if args.images % max(args.group_sizes):
    parser.error(f'--images={args.images} must be a multiple of every group size {args.group_sizes}')

  codes = {'': (train_step_lib, model_from_config, make_config(args))}  # label -> (train_step, model_from_config, config)
  if args.reference:
    ref = import_reference(args.reference)
    codes['ref'] = (ref['train_step'], ref['dit'].model_from_config, make_config(args, ref['default']))
  config = codes[''][2]
  arch = describe.arch_from_config(config.model)
  load = [os.getloadavg()]
  kinds = {n: step_kind(args.images, n) for n in args.group_sizes}
  keys = [(n, code) for n in kinds for code in codes]  # interleaved: each step kind, this code then the reference
  steps, states = {}, {}
  for n, code in keys:
    lib, build, code_config = codes[code]
    steps[n, code] = make_step(code_config, kinds[n], lib)
    states[n, code] = lib.create_train_state(build(code_config.model), code_config, jax.random.PRNGKey(0))
  batch = make_batch(config, args.images, 0)
  flops = {n: describe.step_flops(arch, kind)['model'] for n, kind in kinds.items()}
  shapes = matmul_shapes(args.images * arch.tokens, args.hidden_size)
  operands = [(jnp.asarray(np.random.default_rng(1).standard_normal((a, k), np.float32)),
               jnp.asarray(np.random.default_rng(2).standard_normal((k, b), np.float32))) for a, k, b in shapes]
  dot = jax.jit(jnp.dot)
  compile_s, first_loss = {}, {}
  for key in keys:  # compile + one warm-up step each
    compile_s[key], (states[key], metrics) = timed(steps[key], states[key], batch)
    first_loss[key] = float(metrics['loss'])
  for a, b in operands:
    jax.block_until_ready(dot(a, b))

  step_s = {key: [] for key in keys}
  matmul_s = [[] for _ in shapes]
  ratio = {key: [] for key in keys}
  for _ in range(args.repeats):
    round_step = {}
    for key in keys:
      round_step[key], (states[key], metrics) = timed(steps[key], states[key], batch, label=key)
      step_s[key].append(round_step[key])
      if not np.isfinite(float(metrics['loss'])):
        raise RuntimeError(f'non-finite loss {metrics}: the timed step did not do the real work')
    for i, (a, b) in enumerate(operands):
      matmul_s[i].append(min(timed(dot, a, b, label=shapes[i])[0] for _ in range(3)))
    round_peak = max(2 * a * k * b / t[-1] for (a, k, b), t in zip(shapes, matmul_s))
    for n, code in keys:
      ratio[n, code].append(flops[n] / round_step[n, code] / round_peak)
  load.append(os.getloadavg())

  def name(key, short=False):
    n, code = key
    text = ('singles' if n == 1 else f'groups of {n}' if short else f'unconditional groups of {n}')
    return text + (f' ({code}: {args.reference})' if code and not short else f' ({code})' if code else '')

  rates = [[2 * a * k * b / t for t in ts] for (a, k, b), ts in zip(shapes, matmul_s)]
  peak = max(max(r) for r in rates)
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(f'model: depth {args.depth}, width {args.hidden_size}, {args.num_heads} heads, {arch.tokens} tokens/image, '
        f'{args.images} images/step, fp32, attention_impl={args.attention_impl}')
  print('load average (1/5/15 min) before / after the timed rounds: '
        + ' / '.join('(' + ', '.join(f'{x:.2f}' for x in l) + ')' for l in load))
  if args.reference:
    print('loss of the first step (same batch, init and key): '
          + ', '.join(f'{name(key, True)} {first_loss[key]:.6f}' for key in keys))
  print('\nfp32 matmul of the model shapes (best of 3 per round; min / median over rounds):')
  for (a, k, b), r in zip(shapes, rates):
    print(f'  {a} x {k} x {b}: {max(r) / 1e9:.1f} / {np.median(r) / 1e9:.1f} GFLOP/s')
  print(f'  peak (best shape, best round): {peak / 1e9:.1f} GFLOP/s')
  print('\n| step | compile + 1st | step (min) | step (median) | img/s | GFLOP/step | GFLOP/s (min) '
        '| % of same-round peak (best / median) |')
  print('|---|---|---|---|---|---|---|---|')
  for key in keys:
    n = key[0]
    best, median = min(step_s[key]), float(np.median(step_s[key]))
    print(f'| {name(key)} | {compile_s[key]:.1f} s | {best * 1e3:.0f} ms | {median * 1e3:.0f} ms | '
          f'{args.images / best:.2f} | {flops[n] / 1e9:.1f} | {flops[n] / best / 1e9:.1f} | '
          f'{100 * max(ratio[key]):.0f}% / {100 * np.median(ratio[key]):.0f}% |')
  if args.reference:
    print('\nthis code / reference, step time of the same round (min / median over rounds): ' + '; '.join(
        f'{name((n, ""), True)} '
        + '{:.3f} / {:.3f}'.format(*(f(np.divide(step_s[n, ''], step_s[n, 'ref'])) for f in (np.min, np.median)))
        for n in kinds))

  # Process CPU time (both cores' threads) is what the work costs whatever else the machine runs: a second,
  # load-robust ratio (it does not see a step that leaves a core idle, which the wall-clock ratio does).
  cpu_peak = max(2 * a * k * b / min(CPU_SECONDS[shape]) for shape in shapes for a, k, b in [shape])
  print(f'\nper CPU-second (process CPU time, both cores): matmul peak {cpu_peak / 1e9:.1f} GFLOP/cpu-s')
  for key in keys:
    n, cpu = key[0], min(CPU_SECONDS[key])
    print(f'  {name(key, True)}: {flops[n] / cpu / 1e9:.1f} GFLOP/cpu-s '
          f'({cpu:.2f} cpu-s for {min(step_s[key]):.2f} s wall), {100 * flops[n] / cpu / cpu_peak:.0f}% of the peak')

  if args.no_profile:
    return
  for key in keys:
    states[key], by_class, total, traced_s, top = breakdown(steps[key], states[key], batch, args.profile_dir)
    print(f'\nbreakdown, {name(key, True)}: traced step {traced_s * 1e3:.0f} ms, summed op time {total * 1e3:.0f} ms '
          f'(untraced median {np.median(step_s[key]) * 1e3:.0f} ms)')
    print('| class | ms | % of op time |')
    print('|---|---|---|')
    for cls in CLASSES:
      print(f'| {cls} | {by_class[cls] * 1e3:.0f} | {100 * by_class[cls] / total:.1f}% |')
    print('top ops:')
    for (op, cls, op_name), secs in top:
      print(f'  {secs * 1e3:7.1f} ms  {op:28s} {cls.split(" (")[0]:24s} {op_name[-90:]}')

if __name__ == '__main__':
  main()
