"""Nearest-neighbour lists with ScaNN (cosine similarity).

Embeddings are L2-normalised, so the dot product is the cosine similarity.
Output follows the neighbour-list format of docs/method.md, Data formats: row i holds
the K nearest neighbours of i, best first, self excluded, with their scores.
"""

import math
import os
import time

import numpy as np
from absl import logging

# Up to this many rows an exact (brute-force) ScaNN search is cheap.
BRUTE_FORCE_MAX_ROWS = 20_000
# Leaves searched per query tried by `calibrate_search`, cheapest first.
LEAVES_LADDER = (2, 3, 5, 8, 12, 20, 32, 50, 80, 128, 200)


def l2_normalize(x, eps=1e-12):
  """Rows of x [M, D] scaled to unit length (float32)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def scann_params(num_rows, num_neighbors):
  """Index parameters chosen from the data size.

  Small data: exact brute force. Larger: a partitioning tree with about
  sqrt(M) leaves (spherical k-means on up to 100k rows) searching about 1%
  of them (`calibrate_search` chooses it, and the re-ordering depth, from
  a measured recall), asymmetric hashing (4 dims per block, 16 centres each,
  trained on up to 50k rows; plain quantisation, which builds much faster
  than the anisotropic loss) and exact float32 re-ordering of the best 2K
  candidates.
  """
  if num_rows <= BRUTE_FORCE_MAX_ROWS:
    return {'kind': 'brute_force'}
  leaves = int(math.sqrt(num_rows))
  return {'kind': 'tree_ah', 'num_leaves': leaves, 'num_leaves_to_search': leaves_to_search(leaves),
          'training_sample_size': min(num_rows, 100_000), 'spherical': True, 'dims_per_block': 4,
          'anisotropic_quantization_threshold': None, 'ah_training_sample_size': min(num_rows, 50_000),
          'reorder': max(2 * num_neighbors, 100)}


def leaves_to_search(num_leaves):
  """About 1% of the leaves, at least 5."""
  return min(num_leaves, max(5, round(num_leaves / 100)))


def build_searcher(database, num_neighbors, params):
  """A ScaNN searcher of `database` [M, D] (dot product) for `num_neighbors` results, built with every CPU."""
  import scann  # Imports TensorFlow (~5 s): only where it is used.
  builder = scann.scann_ops_pybind.builder(database, num_neighbors, 'dot_product')
  builder = builder.set_n_training_threads(os.cpu_count() or 1)
  if params['kind'] == 'brute_force':
    return builder.score_brute_force().build()
  threshold = params.get('anisotropic_quantization_threshold')
  return (builder.tree(num_leaves=params['num_leaves'], num_leaves_to_search=params['num_leaves_to_search'],
                       training_sample_size=params['training_sample_size'], spherical=params.get('spherical', False))
          .score_ah(params['dims_per_block'],
                    anisotropic_quantization_threshold=float('nan') if threshold is None else threshold,
                    training_sample_size=params.get('ah_training_sample_size', 100_000))
          .reorder(params['reorder']).build())


def _drop_self(found, found_scores, query_rows, num_neighbors):
  """Remove each query's own row from [b, K+1] results (or the last one if self is absent): [b, K]."""
  drop = found == query_rows[:, None]
  drop[:, -1] |= ~drop.any(1)
  keep = np.argsort(drop, axis=1, kind='stable')[:, :num_neighbors]
  return np.take_along_axis(found, keep, 1), np.take_along_axis(found_scores, keep, 1)


def calibrate_search(searcher, queries, query_rows, exact, num_leaves, reorder, target_recall,
                     reorder_factors=(1, 2, 4), deeper_factors=(8, 16, 32), clock=time.perf_counter):
  """The fastest search settings whose recall@K reaches `target_recall` on calibration queries.

  For each re-ordering depth (`reorder` times `reorder_factors`, then times
  `deeper_factors` while no setting has reached the target yet), tries
  LEAVES_LADDER (up to all leaves) in order until the recall reaches the
  target, or searching more leaves stops helping (a plateau: the depth is
  the limit). Among the settings that reach the target, the one whose
  search of the queries took least time wins; if none does, the one with
  the highest recall. (Coarse asymmetric hashing of low-dimensional or
  sparse embeddings, e.g. 60,000 Fashion-MNIST encoder features, needs
  thousands of candidates re-ordered: recall@32 0.76 at depth 400.)

  Args:
    searcher: a tree ScaNN searcher over the embeddings (K + 1 results).
    queries: float32 [Q, D], the embeddings of `query_rows` (int [Q]).
    exact: int [Q, K] exact neighbours of the queries (self excluded).
    num_leaves: leaves of the searcher's tree.
    reorder: the index's re-ordering depth.
    target_recall: recall@K to reach.
    reorder_factors: depths always tried, as multiples of `reorder`.
    deeper_factors: depths tried after those while the target is not reached.

  `clock` () -> seconds times each search (injected by tests).

  Returns:
    (leaves to search, re-ordering depth, [[leaves, depth, recall, seconds], ...] as tried).
  """
  num_neighbors = exact.shape[1]
  ladder = [leaves for leaves in LEAVES_LADDER if leaves < num_leaves]
  ladder += [num_leaves] if num_leaves <= LEAVES_LADDER[-1] else []
  tried = []
  for factor in tuple(reorder_factors) + tuple(deeper_factors):
    if factor not in reorder_factors and any(t[2] >= target_recall for t in tried):
      break
    depth, recalls = reorder * factor, []
    for leaves in ladder:
      start = clock()
      found, found_scores = searcher.search_batched_parallel(queries, final_num_neighbors=num_neighbors + 1,
                                                             pre_reorder_num_neighbors=depth, leaves_to_search=leaves)
      seconds = clock() - start
      found, _ = _drop_self(np.asarray(found), np.asarray(found_scores), query_rows, num_neighbors)
      recalls.append(recall_at_k(found, exact))
      tried.append([leaves, depth, round(recalls[-1], 4), round(seconds, 3)])
      if recalls[-1] >= target_recall or (len(recalls) >= 3 and recalls[-1] - recalls[-3] < 0.002):
        break
  reached = [t for t in tried if t[2] >= target_recall]
  best = min(reached, key=lambda t: t[3]) if reached else max(tried, key=lambda t: (t[2], -t[3]))
  return best[0], best[1], tried


def nearest_neighbors(embeddings, num_neighbors, params=None, batch_size=4096, progress=None, calibration=None,
                      target_recall=None):
  """Top-K neighbours of every row among the other rows.

  Args:
    embeddings: [M, D] L2-normalised rows.
    num_neighbors: K (self excluded).
    params: index parameters (default: `scann_params(M, K)`).
    batch_size: queries per ScaNN call (searched on every CPU).
    progress: optional callable(rows_done, rows_total).
    calibration: optional (query_rows int [Q], exact neighbours int [Q, K]):
      with `target_recall` and a tree index, the leaves searched and the
      re-ordering depth are chosen on these queries (`calibrate_search`).
    target_recall: recall@K the calibration aims at.

  Returns:
    neighbors int32 [M, K] (best first), scores float32 [M, K] cosine
    similarities, and the params used (with 'calibration': [[leaves,
    depth, recall, seconds], ...] when calibrated).
  """
  embeddings = np.asarray(embeddings, np.float32)
  num_rows = embeddings.shape[0]
  if num_neighbors >= num_rows:
    raise ValueError(f'num_neighbors={num_neighbors} needs more than {num_neighbors} rows; got {num_rows}.')
  params = dict(params or scann_params(num_rows, num_neighbors))
  searcher = build_searcher(embeddings, num_neighbors + 1, params)
  settings = {}
  if params['kind'] == 'tree_ah':
    if calibration is not None and target_recall:
      query_rows, exact = calibration
      params['num_leaves_to_search'], params['reorder'], params['calibration'] = calibrate_search(
          searcher, embeddings[query_rows], np.asarray(query_rows), exact, params['num_leaves'], params['reorder'],
          target_recall)
      logging.info('Calibrated search: %d leaves, re-ordering %d (tried [leaves, depth, recall@%d, s]: %s).',
                   params['num_leaves_to_search'], params['reorder'], num_neighbors, params['calibration'])
    settings = {'leaves_to_search': params['num_leaves_to_search'], 'pre_reorder_num_neighbors': params['reorder']}
  neighbors, scores = search_all(searcher, embeddings, num_neighbors, batch_size, progress, **settings)
  logging.info('Found %d neighbours for %d rows (%s).', num_neighbors, num_rows, params['kind'])
  return neighbors, scores, params


def search_all(searcher, embeddings, num_neighbors, batch_size=4096, progress=None, leaves_to_search=None,
               pre_reorder_num_neighbors=None):
  """Every row of `embeddings` searched in `searcher` (built on them): neighbours [M, K], scores [M, K].

  leaves_to_search, pre_reorder_num_neighbors: tree search settings (None: the index's own).
  """
  num_rows = embeddings.shape[0]
  neighbors = np.empty((num_rows, num_neighbors), np.int32)
  scores = np.empty((num_rows, num_neighbors), np.float32)
  for start in range(0, num_rows, batch_size):
    queries = np.asarray(embeddings[start:start + batch_size], np.float32)
    found, found_scores = searcher.search_batched_parallel(queries, final_num_neighbors=num_neighbors + 1,
                                                           pre_reorder_num_neighbors=pre_reorder_num_neighbors,
                                                           leaves_to_search=leaves_to_search)
    rows = np.arange(start, start + len(queries))
    neighbors[rows], scores[rows] = _drop_self(np.asarray(found), np.asarray(found_scores), rows, num_neighbors)
    if progress is not None:
      progress(start + len(queries), num_rows)
  return neighbors, scores


def exact_neighbors(embeddings, num_neighbors, query_rows=None, batch_size=1024, progress=None):
  """Exact top-K by cosine with JAX (matmul + top_k), self excluded: the recall reference.

  The database is split by rows over all devices (mesh axis 'data'); each
  batch of queries is scored against it and reduced with lax.top_k. Runs on
  CPU too (slowly for large M).

  Args:
    embeddings: [M, D] L2-normalised rows.
    num_neighbors: K.
    query_rows: int [Q] rows to search for (default: all rows).
    batch_size: queries per jitted call.
    progress: optional callable(rows_done, rows_total).

  Returns:
    neighbors int32 [Q, K] (best first), scores float32 [Q, K].
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  embeddings = np.asarray(embeddings, np.float32)
  num_rows = len(embeddings)
  if num_neighbors >= num_rows:
    raise ValueError(f'num_neighbors={num_neighbors} needs more than {num_neighbors} rows; got {num_rows}.')
  query_rows = np.arange(num_rows) if query_rows is None else np.asarray(query_rows)
  devices = jax.devices()
  mesh = Mesh(np.asarray(devices), ('data',))
  padded = -(-num_rows // len(devices)) * len(devices)
  if padded > num_rows:  # no extra host copy of a large database unless the devices need padding
    embeddings_padded = np.pad(embeddings, ((0, padded - num_rows), (0, 0)))
  else:
    embeddings_padded = embeddings
  database = jax.device_put(embeddings_padded, NamedSharding(mesh, P('data')))
  del embeddings_padded

  @jax.jit
  def search(queries, rows, database):
    sims = jnp.einsum('qd,md->qm', queries, database, precision=jax.lax.Precision.HIGHEST)  # [b, M]
    column = jnp.arange(padded)[None, :]
    sims = jnp.where((column == rows[:, None]) | (column >= num_rows), -jnp.inf, sims)
    return jax.lax.top_k(sims, num_neighbors)

  neighbors = np.empty((len(query_rows), num_neighbors), np.int32)
  scores = np.empty((len(query_rows), num_neighbors), np.float32)
  for start in range(0, len(query_rows), batch_size):
    rows = query_rows[start:start + batch_size]
    pad = batch_size - len(rows) if len(query_rows) > batch_size else 0  # one compiled shape
    padded_rows = np.pad(rows, (0, pad))
    found_scores, found = search(embeddings[padded_rows], padded_rows, database)
    scores[start:start + len(rows)] = np.asarray(found_scores)[:len(rows)]
    neighbors[start:start + len(rows)] = np.asarray(found)[:len(rows)]
    if progress is not None:
      progress(start + len(rows), len(query_rows))
  return neighbors, scores


def recall_at_k(found, exact):
  """Mean fraction of the exact top-K found: found, exact int [Q, K]."""
  hits = [len(np.intersect1d(a, b)) for a, b in zip(found, exact)]
  return float(np.mean(hits)) / exact.shape[1]
