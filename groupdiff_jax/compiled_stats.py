"""What a compiled program holds, read from jax's Compiled: memory per device, the compiler's FLOPs and time
estimate, the collectives of its optimized HLO (count, bytes) and its Mosaic kernels (compile_job.py reports them).
"""

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
                         'collective per chain_id (the TPU splits an async collective over several fusions)')


def collectives(hlo_text):
  """{op: {'count', 'bytes'}} of the collectives in optimized HLO text.

  Bytes: the arrays of the instruction's result type, summed (XLA combines
  many gradient all-reduces into one instruction with a tuple result). An
  async `-start` returns (operands, results) in one tuple: the larger half
  is counted (the result of a gather, the operand of a scatter), i.e. the
  bytes moved per device.

  The TPU compiler's async collective fusion splits one collective into a
  chain of fusions (an AsyncCollectiveStart, continuations that overlap it
  with compute, an AsyncCollectiveDone), each holding a copy of the
  collective instruction tagged with the chain's `chain_id`: a chain is one
  collective, counted once.
  """
  out = {op: {'count': 0, 'bytes': 0} for op in COLLECTIVES}
  pattern = re.compile(r'=\s*(.*?)\s(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
  chains = set()
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    chain = _CHAIN.search(line)
    if chain:
      if (match.group(2), chain.group(1)) in chains:
        continue
      chains.add((match.group(2), chain.group(1)))
    sizes = [_BYTES[t] * math.prod(int(d) for d in dims.split(',') if d) for t, dims in _SHAPE.findall(match.group(1))]
    if match.group(3) and len(sizes) > 1:
      half = len(sizes) // 2
      moved = max(sum(sizes[:half]), sum(sizes[half:]))
    else:
      moved = sum(sizes)
    out[match.group(2)]['count'] += 1
    out[match.group(2)]['bytes'] += moved
  return out


def _first(value):
  return value[0] if isinstance(value, (list, tuple)) else value


def analyse(compiled, compile_seconds):
  """memory, cost, collectives and Mosaic kernels of a jax Compiled."""
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0)
            for k in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  # Live at the peak: inputs, outputs not aliased to (donated) inputs, temporaries, code.
  memory['peak'] = memory['argument'] + memory['output'] - memory['alias'] + memory['temp'] + memory['generated_code']
  cost = _first(compiled.cost_analysis()) or {}
  text = compiled.as_text()
  return {'memory_bytes_per_device': memory,
          'compiler_flops_per_device': float(cost.get('flops', 0.0)),
          'compiler_optimal_seconds': float(cost.get('optimal_seconds', 0.0)),
          'compiler_bytes_accessed_per_device': float(cost.get('bytes accessed', 0.0)),
          'collectives': collectives(text),
          'mosaic_kernels': text.count(MOSAIC_TARGET),
          'compile_seconds': compile_seconds}
