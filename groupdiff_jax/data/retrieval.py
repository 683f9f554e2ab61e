"""Nearest-neighbour lists with ScaNN (cosine similarity).

Embeddings are L2-normalised, so the dot product is the cosine similarity.
Output follows the neighbour-list format of METHOD.md section 6: row i holds
the K nearest neighbours of i, best first, self excluded, with their scores.
"""

import logging
import math

import numpy as np

# Up to this many rows an exact (brute-force) ScaNN search is cheap.
BRUTE_FORCE_MAX_ROWS = 20_000


def l2_normalize(x, eps=1e-12):
  """Rows of x [M, D] scaled to unit length (float32)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def scann_params(num_rows, num_neighbors):
  """Index parameters chosen from the data size.

  Small data: exact brute force. Larger: a partitioning tree with about
  sqrt(M) leaves (searching ~5%), asymmetric hashing (2 dims per block,
  anisotropic quantisation) and exact re-ordering of the top candidates.
  """
  if num_rows <= BRUTE_FORCE_MAX_ROWS:
    return {'kind': 'brute_force'}
  leaves = int(math.sqrt(num_rows))
  return {'kind': 'tree_ah', 'num_leaves': leaves, 'num_leaves_to_search': max(1, leaves // 20),
          'training_sample_size': min(num_rows, 250_000), 'dims_per_block': 2,
          'anisotropic_quantization_threshold': 0.2, 'reorder': max(4 * num_neighbors, 100)}


def build_searcher(database, num_neighbors, params):
  import scann  # Imports TensorFlow (~5 s): only where it is used.
  builder = scann.scann_ops_pybind.builder(database, num_neighbors, 'dot_product')
  if params['kind'] == 'brute_force':
    return builder.score_brute_force().build()
  return (builder.tree(num_leaves=params['num_leaves'], num_leaves_to_search=params['num_leaves_to_search'],
                       training_sample_size=params['training_sample_size'])
          .score_ah(params['dims_per_block'],
                    anisotropic_quantization_threshold=params['anisotropic_quantization_threshold'])
          .reorder(params['reorder']).build())


def nearest_neighbors(embeddings, num_neighbors, params=None, batch_size=4096):
  """Top-K neighbours of every row among the other rows.

  Args:
    embeddings: [M, D] L2-normalised rows.
    num_neighbors: K (self excluded).
    params: index parameters (default: `scann_params(M, K)`).

  Returns:
    neighbors int32 [M, K] (best first), scores float32 [M, K] cosine
    similarities, and the params used.
  """
  embeddings = np.asarray(embeddings, np.float32)
  num_rows = embeddings.shape[0]
  if num_neighbors >= num_rows:
    raise ValueError(f'num_neighbors={num_neighbors} needs more than {num_neighbors} rows; got {num_rows}.')
  params = params or scann_params(num_rows, num_neighbors)
  searcher = build_searcher(embeddings, num_neighbors + 1, params)
  neighbors = np.empty((num_rows, num_neighbors), np.int32)
  scores = np.empty((num_rows, num_neighbors), np.float32)
  for start in range(0, num_rows, batch_size):
    queries = embeddings[start:start + batch_size]
    found, found_scores = searcher.search_batched(queries, final_num_neighbors=num_neighbors + 1)
    for row, (ids, sims) in enumerate(zip(found, found_scores)):
      keep = ids != start + row  # drop self wherever it ranks
      neighbors[start + row] = ids[keep][:num_neighbors]
      scores[start + row] = sims[keep][:num_neighbors]
  logging.info('Found %d neighbours for %d rows (%s).', num_neighbors, num_rows, params['kind'])
  return neighbors, scores, params
