"""CPU benchmark: the neighbour job (ScaNN) vs exact NumPy brute force.

  JAX_PLATFORMS=cpu python benchmarks/neighbors.py --rows=100000
  JAX_PLATFORMS=cpu python benchmarks/neighbors.py --rows=1281167 --queries=1000

Data: a synthetic stand-in for DINOv2 embeddings, float32 [M, D], D=1024,
L2-normalised: a two-level Gaussian mixture on the unit sphere, 1000
classes (unit centres) of 10 sub-clusters each (centre + N(0, s_sub^2/D)),
each row a sub-cluster centre + N(0, s_row^2/D), normalised. Written in
chunks to a .npy file in --dir and memory-mapped (1.28M x 1024 is 5.2 GB:
no other full copy is made here).

Timed: `neighbors_job.run` as the job runs it (default flags, K=100):
exact JAX neighbours of the sampled rows (calibration + recall queries),
the ScaNN index build with `retrieval.scann_params`, the calibration of
the leaves searched and the search of every row. "Time to lists" is the
exact sample plus build, calibration and search (the job's
`exact_sample_seconds` + `search_seconds`; writing the files and the tau
report come on top and are in "job wall"). Recall@K: the job's own (JAX
exact search on its recall queries) and, independently, against NumPy
brute force (float32 matmul over the database in chunks + argpartition) on
`--queries` other random rows; the NumPy time on those queries,
multiplied by M / queries, is the brute-force time for all rows
(extrapolated linearly, and printed as such, unless queries == M).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from groupdiff_jax.data import latent_store, neighbors_job, retrieval  # noqa: E402


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
  parser.add_argument('--leaves_to_search', type=int, default=None, help="the job's flag (default: calibrated)")
  parser.add_argument('--target_recall', type=float, default=neighbors_job.TARGET_RECALL)
  args = parser.parse_args()
  print('load average:', os.getloadavg(), flush=True)
  os.makedirs(args.dir, exist_ok=True)
  start = time.time()
  path = os.path.join(args.dir, f'mixture_{args.rows}x{args.dim}.npy')
  data = write_mixture(path, args.rows, args.dim)
  print(f'data {data.shape} ready in {time.time() - start:.0f} s', flush=True)
  embeddings_dir = os.path.join(args.dir, f'embeddings_{args.rows}x{args.dim}')
  os.makedirs(embeddings_dir, exist_ok=True)
  if not os.path.exists(os.path.join(embeddings_dir, neighbors_job.EMBEDDINGS)):
    os.symlink(path, os.path.join(embeddings_dir, neighbors_job.EMBEDDINGS))

  rng = np.random.default_rng(12345)  # not the job's seed: other rows than its recall queries
  queries = np.sort(rng.choice(args.rows, min(args.queries, args.rows), replace=False))
  start = time.time()
  exact, exact_scores = exact_top_k(data, queries, args.k)
  exact_s = time.time() - start
  brute_all_s = exact_s * args.rows / len(queries)
  print(f'NumPy brute force on {len(queries)} queries: {exact_s:.1f} s', flush=True)

  output_dir = os.path.join(args.dir, f'neighbors_{args.rows}x{args.dim}')
  start = time.time()
  meta = neighbors_job.run(embeddings_dir, output_dir, args.k, overwrite=True, leaves_to_search=args.leaves_to_search,
                           target_recall=args.target_recall)
  job_s = time.time() - start
  neighbors, _, _ = latent_store.read_neighbors(output_dir)
  lists_s = meta['exact_sample_seconds'] + meta['search_seconds']
  result = {
      'rows': args.rows, 'dim': args.dim, 'K': args.k, 'params': meta['index'],
      'exact_sample_s': meta['exact_sample_seconds'], 'build_calibrate_search_s': meta['search_seconds'],
      'time_to_lists_s': round(lists_s, 1), 'job_wall_s': round(job_s, 1),
      'recall_at_k_job': round(meta['recall'], 4), 'recall_queries_job': meta['recall_queries'],
      'recall_at_k_vs_numpy': round(retrieval.recall_at_k(np.asarray(neighbors[queries]), exact), 4),
      'numpy_queries': len(queries), 'numpy_brute_force_s_on_queries': round(exact_s, 1),
      'numpy_brute_force_s_all_rows': round(brute_all_s, 1), 'brute_force_extrapolated': bool(len(queries) < args.rows),
      'speedup_vs_numpy': round(brute_all_s / lists_s, 1),
      'exact_top1_cos_mean': round(float(exact_scores[:, 0].mean()), 3),
      'exact_topk_cos_mean': round(float(exact_scores[:, -1].mean()), 3),
      'self_excluded': bool((np.asarray(neighbors[queries]) != queries[:, None]).all()),
      'peak_rss_gb': peak_rss_gb()}
  print(json.dumps(result), flush=True)
  print('load average:', os.getloadavg(), flush=True)


if __name__ == '__main__':
  main()
