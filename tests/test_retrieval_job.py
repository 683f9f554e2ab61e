"""The neighbour job: exact JAX search, ScaNN lists equal to exact search, recall and tau report in meta.json."""

import os

import numpy as np
import pytest

from groupdiff_jax.data import latent_store, neighbors_job, retrieval


def clustered(m, d=16, clusters=20, noise=0.5, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, d))
  return retrieval.l2_normalize(centres[rng.integers(0, clusters, m)] + noise * rng.standard_normal((m, d)))


def numpy_exact(emb, k):
  sims = emb @ emb.T
  np.fill_diagonal(sims, -np.inf)
  order = np.argsort(-sims, axis=1)[:, :k]
  return order, np.take_along_axis(sims, order, 1)


def test_exact_jax_search_equals_numpy_and_excludes_self():
  emb = clustered(300)
  found, scores = retrieval.exact_neighbors(emb, 7, batch_size=128)
  order, sims = numpy_exact(emb, 7)
  np.testing.assert_array_equal(found, order)
  np.testing.assert_allclose(scores, sims, atol=1e-5)
  sub, _ = retrieval.exact_neighbors(emb, 7, query_rows=np.array([5, 17]))
  np.testing.assert_array_equal(sub, order[[5, 17]])
  assert retrieval.recall_at_k(found, order) == 1.0


def test_drop_self_keeps_rank_order():
  found = np.array([[3, 0, 4], [1, 2, 5]])
  kept, sc = retrieval._drop_self(found, found * 1.0, np.array([0, 9]), 2)
  np.testing.assert_array_equal(kept, [[3, 4], [1, 2]])


@pytest.fixture(scope='module')
def embeddings_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('emb')
  np.save(root / 'embeddings.npy', clustered(1500).astype(np.float16))
  latent_store.write_meta(str(root), {'encoder': 'test', 'D': 16})
  return str(root)


def test_job_writes_lists_equal_to_exact_search(embeddings_dir, tmp_path):
  meta = neighbors_job.run(embeddings_dir, str(tmp_path), k=10, recall_queries=200, group_sizes=(4,))
  neighbors, scores, _ = latent_store.read_neighbors(str(tmp_path), num_rows=1500, min_neighbors=3)
  emb = np.load(os.path.join(embeddings_dir, 'embeddings.npy')).astype(np.float32)
  order, sims = numpy_exact(emb, 10)
  # Equal to exact search up to ties in float16 data: compare the scores, and most ids.
  np.testing.assert_allclose(scores.astype(np.float32), sims, atol=2e-3)
  assert (neighbors == order).mean() > 0.99
  assert meta['recall'] > 0.99 and meta['K'] == 10 and meta['index']['kind'] == 'brute_force'
  coverage = meta['anchors_with_n_minus_1_above_tau']['4']
  assert coverage == pytest.approx(((sims >= 0.7).sum(1) >= 3).mean(), abs=0.01)
  with pytest.raises(neighbors_job.JobInputError, match='--overwrite'):
    neighbors_job.run(embeddings_dir, str(tmp_path), k=10)


def test_partitioned_index_reports_measured_recall(embeddings_dir, tmp_path):
  meta = neighbors_job.run(embeddings_dir, str(tmp_path), k=10, index='tree_ah', recall_queries=300)
  assert meta['index']['kind'] == 'tree_ah' and meta['index']['num_leaves'] == 38
  neighbors, _, _ = latent_store.read_neighbors(str(tmp_path))
  emb = np.load(os.path.join(embeddings_dir, 'embeddings.npy')).astype(np.float32)
  exact, _ = numpy_exact(emb, 10)
  assert 0 < meta['recall'] <= 1
  assert abs(meta['recall'] - retrieval.recall_at_k(neighbors, exact)) < 0.1  # the sample estimates the whole
  # Searching every leaf with exact re-ordering finds at least what the default search finds.
  wide = neighbors_job.run(embeddings_dir, str(tmp_path), k=10, index='tree_ah', recall_queries=300,
                           overwrite=True, leaves_to_search=1000)
  assert wide['index']['num_leaves_to_search'] == 38 and wide['recall'] >= meta['recall']


def test_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(neighbors_job.JobInputError, match='embeddings.npy: missing'):
    neighbors_job.run(str(tmp_path), str(tmp_path / 'out'))
  np.save(tmp_path / 'embeddings.npy', np.full((50, 4), 3.0, np.float32))
  with pytest.raises(neighbors_job.JobInputError, match='not L2-normalised'):
    neighbors_job.run(str(tmp_path), str(tmp_path / 'out'))
  np.save(tmp_path / 'embeddings.npy', np.eye(4, dtype=np.float32))
  with pytest.raises(neighbors_job.JobInputError, match='--k=100 needs more than 100 rows'):
    neighbors_job.run(str(tmp_path), str(tmp_path / 'out'))


class FakeSearcher:
  """Exact results when searching >= `leaves` leaves with >= `depth` candidates re-ordered, else half missed.

  Costs 1 ms per leaf and 100 candidates on its own clock (`clock`, given to calibrate_search), so the
  measured time orders the settings by their cost whatever the machine's load.
  """

  def __init__(self, exact_with_self, leaves, depth):
    self.exact, self.leaves, self.depth, self.calls = exact_with_self, leaves, depth, []
    self.now = 0.0

  def clock(self):
    return self.now

  def search_batched_parallel(self, queries, final_num_neighbors, pre_reorder_num_neighbors, leaves_to_search):
    self.calls.append((leaves_to_search, pre_reorder_num_neighbors))
    self.now += 1e-3 * leaves_to_search * pre_reorder_num_neighbors / 100
    found = self.exact.copy()
    if leaves_to_search < self.leaves or pre_reorder_num_neighbors < self.depth:
      found[:, 2::2] = -1  # 4 of the 8 true neighbours missed
    return found, np.zeros(found.shape, np.float32)


def test_calibration_picks_the_fastest_setting_that_reaches_the_target():
  rows = np.arange(6)
  exact = (rows[:, None] + 1 + np.arange(8)) % 50  # [6, 8], self excluded
  with_self = np.concatenate([rows[:, None], exact], 1)

  def calibrate(searcher, num_leaves=40):
    return retrieval.calibrate_search(searcher, None, rows, exact, num_leaves, reorder=100, target_recall=0.97,
                                      clock=searcher.clock)

  searcher = FakeSearcher(with_self, leaves=5, depth=0)
  leaves, depth, tried = calibrate(searcher)
  assert (leaves, depth) == (5, 100)
  assert searcher.calls == [(2, 100), (3, 100), (5, 100), (2, 200), (3, 200), (5, 200), (2, 400), (3, 400), (5, 400)]
  assert [t[2] for t in tried[:3]] == [0.5, 0.5, 1.0]
  # Deeper re-ordering needed: a plateau at depth 100 ends that ladder.
  leaves, depth, tried = calibrate(FakeSearcher(with_self, leaves=3, depth=200))
  assert (leaves, depth) == (3, 200)
  assert [t[:3] for t in tried[:5]] == [[2, 100, 0.5], [3, 100, 0.5], [5, 100, 0.5], [2, 200, 0.5], [3, 200, 1.0]]
  # Only deeper than the always-tried depths (100, 200, 400): deeper ones until one reaches it, no further.
  searcher = FakeSearcher(with_self, leaves=2, depth=1600)
  leaves, depth, tried = calibrate(searcher)
  assert (leaves, depth) == (2, 1600) and sorted({t[1] for t in tried}) == [100, 200, 400, 800, 1600]
  # Never reached: every depth tried (a plateau of 3 leaves each), the best recall, fastest.
  leaves, depth, tried = calibrate(FakeSearcher(with_self, leaves=10**6, depth=0))
  assert (leaves, depth) == (2, 100) and len(tried) == 18 and tried[-1][1] == 3200
  # A tree smaller than the ladder's first rung searches all its leaves.
  leaves, depth, tried = calibrate(FakeSearcher(with_self, leaves=1, depth=0), num_leaves=2)
  assert (leaves, depth) == (2, 100) and tried[0][:3] == [2, 100, 1.0]


def test_job_calibrates_search_on_other_queries_than_the_reported_recall(embeddings_dir, tmp_path):
  meta = neighbors_job.run(embeddings_dir, str(tmp_path), k=10, index='tree_ah', recall_queries=300,
                           target_recall=0.99, calibration_queries=200)
  index = meta['index']
  chosen = [t for t in index['calibration'] if t[:2] == [index['num_leaves_to_search'], index['reorder']]]
  assert chosen and chosen[0][2] >= 0.99
  first_depth = [t for t in index['calibration'] if t[1] == index['calibration'][0][1]]
  assert [t[0] for t in first_depth] == list(retrieval.LEAVES_LADDER[:len(first_depth)])
  assert all(t[2] < 0.99 for t in first_depth[:-1])  # each depth's ladder stops at the target
  assert meta['recall_queries'] == 300 and meta['recall'] > 0.9
  fixed = neighbors_job.run(embeddings_dir, str(tmp_path), k=10, index='tree_ah', recall_queries=300, overwrite=True,
                            leaves_to_search=3)
  assert 'calibration' not in fixed['index'] and fixed['index']['num_leaves_to_search'] == 3
