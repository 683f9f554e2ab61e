"""What a compiled program holds, read from jax's Compiled: memory per device, the compiler's FLOPs and time
estimate, the collectives of its optimized HLO (count, bytes) and its Mosaic kernels (compile_job.py reports them).
"""

import functools
import math
import re

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
MOSAIC_TARGET = 'custom_call_target="tpu_custom_call"'


# --- Reading a compiled program -----------------------------------------------
_SHAPE = re.compile(r'\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'f32': 4,
          's64': 8, 'u64': 8, 'f64': 8}
_CHAIN = re.compile(r'chain_id="(\d+)"')


COLLECTIVE_BYTES_RULE = ('per device, summed over tuple results (the larger half of an async -start); one '
                         'collective per chain_id (the TPU splits an async collective over several fusions); '
                         'times the trip count of the while loops it runs in (windowed einsums)')

_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.-]+) \(.*\{$')
_WHILE = re.compile(r'\swhile\(.*?condition=%?([\w.-]+), body=%?([\w.-]+)')
_TRIP = re.compile(r'known_trip_count[^0-9]*(\d+)')
_CALLEE = re.compile(r'(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.-]+)'
                     r'|branch_computations=\{([^}]*)\}')


def _computations(hlo_text):
  """{name: [lines]} of the HLO module's computations, and the ENTRY's name."""
  comps, entry, name = {}, None, None
  for line in hlo_text.splitlines():
    if name is None or not line[:1].isspace():
      match = _COMPUTATION.match(line.rstrip())
      if match:
        name = match.group(1)
        comps[name] = []
        entry = name if line.startswith('ENTRY') else entry
        continue
    if name is not None and line.rstrip() == '}':  # (an instruction's text may span lines)
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def _definitions(lines):
  """{instruction name: its line} of one computation."""
  return {m.group(1): line for line in lines for m in [re.match(r'\s*(?:ROOT )?%([\w.-]+) = ', line)] if m}


def _operands(line):
  """The %names an instruction's line takes as operands (the first parenthesised list after its opcode)."""
  match = re.search(r' [a-z][\w-]*\(([^()]*%[^()]*)\)', line.split(' = ', 1)[-1])
  return re.findall(r'%([\w.-]+)', match.group(1)) if match else []


def _constant(defs, name):
  """The integer value of instruction `name` (a constant, or copies of one), else None."""
  line = defs.get(name, '')
  while ' copy(' in line:
    line = defs.get((_operands(line) or [''])[0], '')
  match = re.search(r' constant\((-?\d+)\)', line)
  return int(match.group(1)) if match else None


def _trip_count(while_line, caller, defs):
  """Iterations of a while loop: XLA's known_trip_count, else from its counter: `i < bound` in the
  condition, `i + step` in the body's result, i's start in the loop's initial tuple (the form of XLA's
  windowed einsum loops); 1 where it cannot be read. defs: computation name -> its _definitions."""
  known = _TRIP.search(while_line)
  if known:
    return int(known.group(1))
  loop = _WHILE.search(while_line)
  cond, body = defs(loop.group(1)), defs(loop.group(2))
  roots = [line for line in cond.values() if 'ROOT' in line and ' compare(' in line and 'direction=LT' in line]
  if not roots:
    return 1
  counter, bound = (_operands(roots[0]) + [None, None])[:2]
  index = re.search(r'get-tuple-element\(.*index=(\d+)', cond.get(counter, ''))
  bound = _constant(cond, bound)
  caller_defs = defs(caller)
  body_root = _operands(next((line for line in body.values() if 'ROOT' in line and ' tuple(' in line), ''))
  init = caller_defs.get((_operands(while_line) or [''])[0], '')
  init = _operands(init) if ' tuple(' in init else []
  k = int(index.group(1)) if index else -1
  if bound is None or not 0 <= k < min(len(body_root), len(init)):
    return 1
  increment = body.get(body_root[k], '')
  steps = [v for v in (_constant(body, name) for name in _operands(increment)) if v] if ' add(' in increment else []
  start = _constant(caller_defs, init[k])
  if len(steps) != 1 or start is None or steps[0] <= 0:
    return 1
  return max(0, -(-(bound - start) // steps[0]))


def _runs_per_step(comps, entry):
  """{computation: times it runs per execution of the program}: 1 for the ENTRY, callers' counts summed
  (a while body's times its trip count); a computation no call reaches counts 1."""
  calls = {name: [] for name in comps}  # callee -> [(caller, factor)]
  defs = functools.lru_cache(maxsize=None)(lambda name: _definitions(comps.get(name, [])))
  for caller, lines in comps.items():
    for line in lines:
      loop = _WHILE.search(line)
      trips = _trip_count(line, caller, defs) if loop else 1
      for match in _CALLEE.finditer(line):
        for callee in (match.group(1),) if match.group(1) else re.findall(r'%?([\w.-]+)', match.group(2)):
          if callee in calls:
            calls[callee].append((caller, trips if loop and callee == loop.group(2) else 1))
  runs = {}

  def count(name, seen=()):
    if name not in runs:
      if name == entry or not calls[name] or name in seen:
        runs[name] = 1
      else:
        runs[name] = sum(count(caller, seen + (name,)) * factor for caller, factor in calls[name])
    return runs[name]

  for name in comps:
    count(name)
  return runs


def collective_instructions(hlo_text):
  """Each collective of optimized HLO text as executed: dicts of op, result (its array types, as text),
  bytes (moved per device, once), runs (times per step), op_name (the jax source op) and replica_groups.

  Bytes: the arrays of the instruction's result type, summed (XLA combines
  many gradient all-reduces into one instruction with a tuple result). An
  async `-start` returns (operands, results[, u32 context scalars]) in one
  tuple: the larger half of the arrays is counted (the result of a gather,
  the operand of a scatter), i.e. the bytes moved per device.

  The TPU compiler's async collective fusion splits one collective into a
  chain of fusions (an AsyncCollectiveStart, continuations that overlap it
  with compute, an AsyncCollectiveDone), each holding a copy of the
  collective instruction tagged with the chain's `chain_id`: a chain is one
  collective, listed once. A windowed einsum (a weight gradient's
  reduce-scatter overlapped with its matmul) is a while loop whose body
  passes slices round a ring by collective-permutes: an instruction in a
  loop runs once per iteration.
  """
  pattern = re.compile(r'=\s*(.*?)\s(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
  comps, entry = _computations(hlo_text)
  if not comps:  # bare instructions (no module text)
    comps, entry = {'': hlo_text.splitlines()}, ''
  runs = _runs_per_step(comps, entry)
  chains = set()
  found = []
  for name, lines in comps.items():
    for line in lines:
      match = pattern.search(line)
      if not match:
        continue
      chain = _CHAIN.search(line)
      if chain:
        if (match.group(2), chain.group(1)) in chains:
          continue
        chains.add((match.group(2), chain.group(1)))
      shapes = _SHAPE.findall(match.group(1))
      if match.group(3):  # an async start's u32[] / s32[] context scalars are not data
        shapes = [(t, dims) for t, dims in shapes if dims or t not in ('u32', 's32')] or shapes
      sizes = [_BYTES[t] * math.prod(int(d) for d in dims.split(',') if d) for t, dims in shapes]
      if match.group(3) and len(sizes) > 1:
        half = len(sizes) // 2
        moved_half = shapes[half:] if sum(sizes[half:]) >= sum(sizes[:half]) else shapes[:half]
        moved, shapes = max(sum(sizes[:half]), sum(sizes[half:])), moved_half
      else:
        moved = sum(sizes)
      op_name = re.search(r'op_name="([^"]*)"', line)
      groups = re.search(r'replica_groups=(\S+?\]?\s?\{[^}]*\}|\{[^ ]*)', line)
      found.append({'op': match.group(2), 'result': ' '.join(f'{t}[{d}]' for t, d in shapes), 'bytes': moved,
                    'runs': runs[name], 'op_name': op_name.group(1) if op_name else '',
                    'replica_groups': groups.group(1) if groups else ''})
  return found


def collectives(hlo_text):
  """{op: {'count', 'bytes'}} of the collectives in optimized HLO text, as executed once per step
  (collective_instructions: what counts as one, and its bytes)."""
  out = {op: {'count': 0, 'bytes': 0} for op in COLLECTIVES}
  for c in collective_instructions(hlo_text):
    out[c['op']]['count'] += c['runs']
    out[c['op']]['bytes'] += c['bytes'] * c['runs']
  return out


def _first(value):
  return value[0] if isinstance(value, (list, tuple)) else value


def analyse(compiled, compile_seconds, text=None):
  """memory, cost, collectives and Mosaic kernels of a jax Compiled (text: its as_text(), when already read)."""
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0)
            for k in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  # Live at the peak: inputs, outputs not aliased to (donated) inputs, temporaries, code.
  memory['peak'] = memory['argument'] + memory['output'] - memory['alias'] + memory['temp'] + memory['generated_code']
  cost = _first(compiled.cost_analysis()) or {}
  text = compiled.as_text() if text is None else text
  return {'memory_bytes_per_device': memory,
          'compiler_flops_per_device': float(cost.get('flops', 0.0)),
          'compiler_optimal_seconds': float(cost.get('optimal_seconds', 0.0)),
          'compiler_bytes_accessed_per_device': float(cost.get('bytes accessed', 0.0)),
          'collectives': collectives(text),
          'mosaic_kernels': text.count(MOSAIC_TARGET),
          'compile_seconds': compile_seconds}
