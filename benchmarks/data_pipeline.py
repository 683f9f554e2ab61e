"""CPU benchmark: group pipeline throughput (latents/s per host) and official_plan epoch planning time.

  JAX_PLATFORMS=cpu python benchmarks/data_pipeline.py --rows=200000 --steps=400
  JAX_PLATFORMS=cpu python benchmarks/data_pipeline.py --part=plan --plan_rows=1281167

Pipeline: writes a latent store of `rows` random float16 latents
[M, 32, 32, 4] (a flipped copy [M, 2, ...] with --flips) and synthetic
neighbour lists K=100 to --dir (kept and reused by later runs), opens them
as training does (memory-mapped latents, neighbour lists loaded), and times
`GroupPipeline.batch` for each step kind at the trainer's batch size: all
singles (group_ratio 0), all unconditional groups of N (group_ratio 1), and
GroupDiff-l's mix (group_ratio 0.1), after `warmup` steps (which build the
epoch's group plan and fill the page cache), with a consumer that does
nothing else: the rate the pipeline can feed. Each setting is timed for
every --prefetch value, side by side in one run: 0 assembles each step in
the consumer's thread, > 0 serves the steps from the pipeline's tf.data
stream (parallel assembly, that many steps ahead). The store is read from the page cache once warm; a
cold read is bound by the disk instead.

Plan: `grouping.official_epoch_plan` for `plan_rows` rows x K=100, the
work done once per epoch (by whichever tf.data thread first needs the
epoch's plan).

Synthetic neighbour lists: rows fall in clusters of 1281 (ImageNet's
~1,281 images per class) in random row order; each row's K neighbours are
distinct other members of its cluster, best first by a decreasing score.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from groupdiff_jax import step_plan  # noqa: E402
from groupdiff_jax.data import grouping, latent_store, pipeline  # noqa: E402

CLUSTER = 1281  # ImageNet train images per class


def clustered_neighbors(num_rows, k, rng, cluster_size=CLUSTER):
  """int32 [M, K]: distinct members of the row's cluster (rows in random order), self excluded."""
  order = rng.permutation(num_rows).astype(np.int32)
  out = np.empty((num_rows, k), np.int32)
  for start in range(0, num_rows, 1 << 16):
    i = np.arange(start, min(num_rows, start + (1 << 16)))
    cluster, pos = np.divmod(i, cluster_size)
    size = np.minimum(cluster_size, num_rows - cluster * cluster_size)
    if (size <= k).any():
      raise ValueError(f'A cluster of {size.min()} rows cannot give {k} neighbours.')
    stride = rng.integers(1, np.maximum(2, (size - 1) // k))  # offsets j*stride are distinct mod size-1
    offsets = 1 + (rng.integers(0, size - 1)[:, None] + np.arange(k) * stride[:, None]) % (size[:, None] - 1)
    out[order[i]] = order[cluster[:, None] * cluster_size + (pos[:, None] + offsets) % size[:, None]]
  return out


def write_store(directory, rows, k, flips, seed=0, chunk=8192):
  """The benchmark's latent store + neighbour lists (reused when already there)."""
  latents_dir, neighbors_dir = os.path.join(directory, 'latents'), os.path.join(directory, 'neighbors')
  shape = (rows, 2, 32, 32, 4) if flips else (rows, 32, 32, 4)
  try:
    store = latent_store.LatentStore(latents_dir)
    if store.latents.shape == shape and os.path.exists(os.path.join(neighbors_dir, latent_store.NEIGHBORS)):
      return latents_dir, neighbors_dir
  except latent_store.StoreError:
    pass
  start = time.time()
  rng = np.random.default_rng(seed)
  os.makedirs(latents_dir, exist_ok=True)
  out = np.lib.format.open_memmap(os.path.join(latents_dir, latent_store.LATENTS), 'w+', np.float16, shape)
  for i in range(0, rows, chunk):
    n = min(chunk, rows - i)
    out[i:i + n] = rng.standard_normal((n,) + shape[1:], np.float32).astype(np.float16)
  out.flush()
  del out
  np.save(os.path.join(latents_dir, latent_store.LABELS), (np.arange(rows) // CLUSTER % 1000).astype(np.int32))
  latent_store.write_meta(latents_dir, {'source': 'benchmark (random)', 'count': rows, 'dtype': 'float16',
                                        'flipped': flips})
  neighbors = clustered_neighbors(rows, k, rng)
  scores = np.broadcast_to(np.linspace(0.9, 0.5, k, dtype=np.float32), neighbors.shape)
  latent_store.write_neighbors(neighbors_dir, neighbors, scores, {'tau': 0.7, 'source': 'benchmark (synthetic)'})
  print(f'Wrote {rows:,} rows to {directory} in {time.time() - start:.1f} s.', flush=True)
  return latents_dir, neighbors_dir


def time_pipeline(dirs, batch_size, group_size, group_ratio, grouping_name, flips, warmup, steps, prefetch):
  store = latent_store.LatentStore(dirs[0])
  neighbors, scores, _ = latent_store.read_neighbors(dirs[1], len(store), group_size - 1)
  kinds = step_plan.step_kinds(batch_size, group_size, group_ratio)
  pipe = pipeline.GroupPipeline(store, kinds, seed=0, group_ratio=group_ratio, grouping=grouping_name,
                                neighbors=np.asarray(neighbors), scores=scores, random_flip=flips,
                                prefetch=prefetch)
  start = time.perf_counter()
  first = None
  for step in range(warmup + steps):
    if step == warmup:
      start = time.perf_counter()
    parts = pipe.batch(step, kinds[pipe.kind_name(step)])
    if first is None:
      first = time.perf_counter() - start
    assert parts[0]['images'].dtype == np.float32
  seconds = time.perf_counter() - start
  pipe.close()
  return {'grouping': grouping_name, 'group_ratio': group_ratio, 'batch_size': batch_size, 'flips': flips,
          'steps': steps, 'prefetch': prefetch, 'latents_per_s': round(steps * batch_size / seconds), 'ms_per_step': round(
              1000 * seconds / steps, 2), 'first_step_s': round(first, 2)}


def time_plan(rows, k, group_size, seed=0):
  start = time.time()
  neighbors = clustered_neighbors(rows, k, np.random.default_rng(seed))
  made = time.time() - start
  start = time.time()
  groups = grouping.official_epoch_plan(neighbors, group_size, np.random.default_rng(seed + 1))
  seconds = time.time() - start
  return {'rows': rows, 'K': k, 'group_size': group_size, 'plan_s': round(seconds, 2),
          'groups': len(groups), 'grouped_fraction': round(groups.size / rows, 3), 'synthetic_lists_s': round(made, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--part', choices=['pipeline', 'plan', 'all'], default='pipeline')
  parser.add_argument('--rows', type=int, default=200_000)
  parser.add_argument('--k', type=int, default=100)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--group_size', type=int, default=4)
  parser.add_argument('--flips', action='store_true', help='store [M, 2, ...] and random_flip')
  parser.add_argument('--warmup', type=int, default=20)
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--prefetch', type=int, nargs='+', default=[0, 2],
                      help='pipeline prefetch values timed side by side (0: no tf.data)')
  parser.add_argument('--plan_rows', type=int, default=1_281_167)
  parser.add_argument('--dir', default='/tmp/groupdiff_bench_store')
  args = parser.parse_args()
  print('load average:', os.getloadavg(), flush=True)
  if args.part in ('pipeline', 'all'):
    directory = args.dir + ('_flips' if args.flips else '')
    dirs = write_store(directory, args.rows, args.k, args.flips)
    for ratio, name in [(0.0, 'official_plan'), (1.0, 'official_plan'), (0.1, 'official_plan'), (1.0, 'tau_random')]:
      for prefetch in args.prefetch:
        result = time_pipeline(dirs, args.batch_size, args.group_size, ratio, name, args.flips, args.warmup,
                               args.steps, prefetch)
        print(json.dumps(dict(result, rows=args.rows)), flush=True)
  if args.part in ('plan', 'all'):
    print(json.dumps(time_plan(args.plan_rows, args.k, args.group_size)), flush=True)
  print('load average:', os.getloadavg(), flush=True)


if __name__ == '__main__':
  main()
