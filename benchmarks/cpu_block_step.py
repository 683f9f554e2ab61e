"""CPU benchmark: FLOP rate of a SiT-B block train step vs the measured matmul peak,
and GroupDiff's overhead (N = 1, 4, 16; GroupDiff-l and -f) next to its FLOP ratio.

  JAX_PLATFORMS=cpu python benchmarks/cpu_block_step.py [--images=16 --repeats=5] [--attention_impl=xla,chunked]

One SiT-B/2 block (hidden 768, 12 heads, 256 tokens per image: a 256 px
image's 32x32 latent in 2x2 patches) at float32, forward + backward with
respect to its parameters and input: the work of a train step per block.
The FLOPs are the analytic count of groupdiff_jax.describe (a multiply-add
is 2). All cases run in one process, one after the other, so their ratios
are comparable even on a machine shared with other jobs; absolute rates
are not. `--attention_impl` takes a comma-separated list of kernels
(model.attention_impl): each group size is timed with each, in this process,
and each kernel's overhead is relative to its own N=1 step.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from groupdiff_jax import describe  # noqa: E402
from groupdiff_jax.models.dit import DiTBlock  # noqa: E402

HIDDEN, HEADS, TOKENS = 768, 12, 256  # SiT-B/2 at 256 px


def best_time(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times), float(np.median(times))


def matmul_peak(repeats):
  """Best FLOP rate of a float32 matmul of the block's own MLP shape."""
  m, k, n = 4096, HIDDEN, 4 * HIDDEN
  a = jnp.ones((m, k), jnp.float32)
  b = jnp.ones((k, n), jnp.float32)
  best, _ = best_time(jax.jit(jnp.dot), a, b, repeats=repeats)
  return 2 * m * k * n / best


def block_step(images, group_size, repeats, attention_impl='xla'):
  block = DiTBlock(HIDDEN, HEADS, attention_impl=attention_impl)
  x = jax.random.normal(jax.random.PRNGKey(0), (images, TOKENS, HIDDEN))
  c = jax.random.normal(jax.random.PRNGKey(1), (images, HIDDEN))
  params = block.init(jax.random.PRNGKey(2), x, c, 1)['params']
  # adaLN-Zero starts at zero: random modulation so every path does work.
  params = jax.tree.map(lambda p: 0.02 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)

  @jax.jit
  def step(params, x, c):
    loss = lambda p, x: jnp.mean(block.apply({'params': p}, x, c, group_size)**2)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  best, median = best_time(step, params, x, c, repeats=repeats)
  return best, median


def block_flops(images, group_size):
  arch = describe.Arch(depth=1, hidden_size=HIDDEN, num_heads=HEADS, patch_size=2, input_size=32, in_channels=4,
                       out_channels=8)
  f = describe.forward_flops(arch, group_size)
  one_block = f['attention'] + (2 * HIDDEN * 6 * HIDDEN + 2 * TOKENS * HIDDEN * (3 + 1 + 8) * HIDDEN)
  return 3 * images * one_block  # forward + backward


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--images', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--group_ratio', type=float, default=0.1)
  parser.add_argument('--group_sizes', default='1,4,16', help='comma-separated; must include 1 (the baseline)')
  parser.add_argument('--attention_impl', default='xla', help='comma-separated model.attention_impl values')
  args = parser.parse_args()
  sizes = [int(n) for n in args.group_sizes.split(',')]
  impls = args.attention_impl.split(',')
  if 1 not in sizes:
    parser.error('--group_sizes must include 1, the baseline of the overhead ratios')
  peak = matmul_peak(args.repeats)
  rows = {impl: {} for impl in impls}
  for n in sizes:
    for impl in impls:  # kernels side by side for each N, so the comparison sees the same machine load
      best, median = block_step(args.images, n, args.repeats, impl)
      flops = block_flops(args.images, n)
      rows[impl][n] = dict(best_s=best, median_s=median, flops=flops, rate=flops / best, of_peak=flops / best / peak)
  r = args.group_ratio
  modes = {impl: {} for impl in impls}
  for impl, by_n in rows.items():
    base = by_n[1]
    for n in sizes:
      if n == 1:
        continue
      # GroupDiff-l: a fraction r of the steps are unconditional groups of N, the rest singles.
      # GroupDiff-f: conditional images are grouped too, so every step has groups of N.
      for mode, t, f in (('l', (1 - r) * base['best_s'] + r * by_n[n]['best_s'],
                          (1 - r) * base['flops'] + r * by_n[n]['flops']), ('f', by_n[n]['best_s'], by_n[n]['flops'])):
        time_ratio, flop_ratio = t / base['best_s'], f / base['flops']
        modes[impl][f'GroupDiff-{mode}, N={n}'] = dict(time_ratio=time_ratio, flop_ratio=flop_ratio,
                                                      overhead_vs_flops=time_ratio / flop_ratio - 1)
  result = dict(jax=jax.__version__, devices=str(jax.devices()), cpu_count=os.cpu_count(),
                load_average=os.getloadavg(), images=args.images, matmul_peak_flops=peak, block=rows, modes=modes)
  print(json.dumps(result, indent=1))
  print(f'\nmatmul peak (float32, {4096}x{HIDDEN}x{4 * HIDDEN}): {peak / 1e9:.1f} GFLOP/s')
  print('| attention | N | step (best) | step (median) | GFLOP/step | GFLOP/s | of matmul peak |')
  print('|---|---|---|---|---|---|---|')
  for n in sizes:
    for impl in impls:
      row = rows[impl][n]
      print(f"| {impl} | {n} | {row['best_s'] * 1e3:.0f} ms | {row['median_s'] * 1e3:.0f} ms | "
            f"{row['flops'] / 1e9:.1f} | {row['rate'] / 1e9:.1f} | {100 * row['of_peak']:.0f}% |")
  print('\n| attention | mode | time / baseline | FLOPs / baseline | overhead beyond FLOPs |')
  print('|---|---|---|---|---|')
  for impl in impls:
    for name, m in modes[impl].items():
      print(f"| {impl} | {name} | {m['time_ratio']:.3f} | {m['flop_ratio']:.3f} | "
            f"{100 * m['overhead_vs_flops']:+.1f}% |")
  if len(impls) > 1:
    print('\n| N | ' + ' | '.join(f'{impl} / {impls[0]}' for impl in impls[1:]) + ' |')
    print('|---|' + '---|' * (len(impls) - 1))
    for n in sizes:
      print(f'| {n} | ' + ' | '.join(f"{rows[impl][n]['best_s'] / rows[impls[0]][n]['best_s']:.3f}"
                                     for impl in impls[1:]) + ' |')


if __name__ == '__main__':
  main()
