"""CPU benchmark: the ScaNN neighbour search of the neighbour job vs exact NumPy brute force.

  JAX_PLATFORMS=cpu python benchmarks/neighbors.py --rows=100000
  JAX_PLATFORMS=cpu python benchmarks/neighbors.py --rows=1281167 --queries=1000

Data: a synthetic stand-in for DINOv2 embeddings, float32 [M, D], D=1024,
L2-normalised: a two-level Gaussian mixture on the unit sphere, 1000
classes (unit centres) of 10 sub-clusters each (centre + N(0, s_sub^2/D)),
each row a sub-cluster centre + N(0, s_row^2/D), normalised. Written in
chunks to a .npy file in --dir and memory-mapped (1.28M x 1024 is 5.2 GB:
no other full copy is made here).

Timed: the two parts of `retrieval.nearest_neighbors` (the neighbour
job's search): `build_searcher` with the parameters `retrieval.scann_params`
picks for M, then `search_all` (top-K of every row, self excluded). Recall@K
against exact search on `queries` random rows; the exact search is NumPy
brute force (float32 matmul over the database in chunks + argpartition),
and its time on those queries, multiplied by M / queries, is the
brute-force time for all rows (extrapolated linearly, and printed as such,
unless queries == M). Then recall and (extrapolated) search time of other
numbers of leaves searched, on the recall queries.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from groupdiff_jax.data import retrieval  # noqa: E402


def write_mixture(path, num_rows, dim, seed=0, classes=1000, subclusters=10, sigma_sub=0.7, sigma_row=0.8,
                  chunk=32768):
  """The benchmark's embeddings as a .npy file (reused when already there); returns the memmap."""
  if os.path.exists(path):
    data = np.load(path, mmap_mode='r')
    if data.shape == (num_rows, dim):
      return data
  rng = np.random.default_rng(seed)
  centres = retrieval.l2_normalize(rng.standard_normal((classes, dim)))
  subs = np.repeat(centres, subclusters, 0) + sigma_sub / np.sqrt(dim) * rng.standard_normal(
      (classes * subclusters, dim)).astype(np.float32)
  out = np.lib.format.open_memmap(path + '.tmp', 'w+', np.float32, (num_rows, dim))
  for start in range(0, num_rows, chunk):
    n = min(chunk, num_rows - start)
    x = subs[rng.integers(0, len(subs), n)] + sigma_row / np.sqrt(dim) * rng.standard_normal((n, dim), np.float32)
    out[start:start + n] = retrieval.l2_normalize(x)
  out.flush()
  del out
  os.replace(path + '.tmp', path)
  return np.load(path, mmap_mode='r')


def exact_top_k(database, query_rows, k, chunk=32768):
  """NumPy brute force: top-k cosine of database[query_rows] over all rows, self excluded. int [Q, k], float [Q, k]."""
  queries = np.asarray(database[query_rows], np.float32)  # [Q, D]
  best_scores = np.full((len(queries), k), -np.inf, np.float32)
  best_ids = np.zeros((len(queries), k), np.int64)
  for start in range(0, len(database), chunk):
    block = np.asarray(database[start:start + chunk])
    sims = queries @ block.T  # [Q, chunk]
    own = (query_rows >= start) & (query_rows < start + len(block))
    sims[np.flatnonzero(own), query_rows[own] - start] = -np.inf
    scores = np.concatenate([best_scores, sims], 1)
    ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + len(block)), sims.shape)], 1)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    best_scores, best_ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
  order = np.argsort(-best_scores, axis=1, kind='stable')
  return np.take_along_axis(best_ids, order, 1), np.take_along_axis(best_scores, order, 1)


def peak_rss_gb():
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM'):
        return round(int(line.split()[1]) / 2**20, 2)
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', type=int, default=100_000)
  parser.add_argument('--dim', type=int, default=1024)
  parser.add_argument('--k', type=int, default=100)
  parser.add_argument('--queries', type=int, default=2000, help='rows whose recall (and brute-force time) is measured')
  parser.add_argument('--dir', default='/tmp/groupdiff_bench_embeddings')
  parser.add_argument('--params', default='', help='JSON overriding retrieval.scann_params (tuning)')
  parser.add_argument('--sweep', type=int, nargs='*', default=[2, 5, 10, 20, 40],
                      help='other num_leaves_to_search measured on the recall queries')
  args = parser.parse_args()
  print('load average:', os.getloadavg(), flush=True)
  os.makedirs(args.dir, exist_ok=True)
  start = time.time()
  data = write_mixture(os.path.join(args.dir, f'mixture_{args.rows}x{args.dim}.npy'), args.rows, args.dim)
  print(f'data {data.shape} ready in {time.time() - start:.0f} s', flush=True)

  rng = np.random.default_rng(1)
  queries = np.sort(rng.choice(args.rows, min(args.queries, args.rows), replace=False))
  start = time.time()
  exact, exact_scores = exact_top_k(data, queries, args.k)
  exact_s = time.time() - start
  brute_all_s = exact_s * args.rows / len(queries)
  print(f'NumPy brute force on {len(queries)} queries: {exact_s:.1f} s', flush=True)

  # What retrieval.nearest_neighbors does, timed in its two parts.
  params = dict(retrieval.scann_params(args.rows, args.k), **json.loads(args.params or '{}'))
  start = time.time()
  searcher = retrieval.build_searcher(data, args.k + 1, params)
  build_s = time.time() - start
  print(f'ScaNN index {params}: built in {build_s:.1f} s', flush=True)

  def progress(done, total):
    if done == total or done % (64 * 4096) == 0:
      print(f'  searched {done:,}/{total:,} at {time.time() - start:.0f} s', flush=True)

  start = time.time()
  neighbors, _ = retrieval.search_all(searcher, data, args.k, progress=progress)
  search_s = time.time() - start
  recall = retrieval.recall_at_k(neighbors[queries], exact)
  result = {
      'rows': args.rows, 'dim': args.dim, 'K': args.k, 'params': params, 'build_s': round(build_s, 1),
      'search_s': round(search_s, 1), 'build_and_search_s': round(build_s + search_s, 1),
      'recall_at_k': round(recall, 4), 'recall_queries': len(queries),
      'numpy_brute_force_s_on_queries': round(exact_s, 1), 'numpy_brute_force_s_all_rows': round(brute_all_s, 1),
      'brute_force_extrapolated': bool(len(queries) < args.rows),
      'speedup_vs_numpy': round(brute_all_s / (build_s + search_s), 1),
      'exact_top1_cos_mean': round(float(exact_scores[:, 0].mean()), 3),
      'exact_topk_cos_mean': round(float(exact_scores[:, -1].mean()), 3),
      'self_excluded': bool((neighbors[queries] != queries[:, None]).all()),
      'peak_rss_gb': peak_rss_gb()}
  print(json.dumps(result), flush=True)

  # Recall / search time for other numbers of leaves searched, on the recall queries only.
  for leaves in sorted(set(args.sweep) - {params.get('num_leaves_to_search')}):
    if params['kind'] != 'tree_ah' or leaves > params['num_leaves']:
      continue
    start = time.time()
    found, _ = searcher.search_batched_parallel(np.asarray(data[queries]), final_num_neighbors=args.k + 1,
                                                leaves_to_search=leaves)  # as search_all does
    seconds = time.time() - start
    found = np.asarray(found)
    found, _ = retrieval._drop_self(found, found.astype(np.float32), queries, args.k)
    print(json.dumps({'num_leaves_to_search': leaves, 'recall_at_k': round(retrieval.recall_at_k(found, exact), 4),
                      'search_s_all_rows_extrapolated': round(seconds * args.rows / len(queries), 1)}), flush=True)
  print('load average:', os.getloadavg(), flush=True)


if __name__ == '__main__':
  main()
