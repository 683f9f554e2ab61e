"""ScaNN neighbour lists and the groupings built from them."""

import numpy as np
import pytest

from groupdiff_jax.data import grouping, retrieval


def test_scann_neighbours_match_exact_search_and_exclude_self():
  rng = np.random.default_rng(0)
  emb = retrieval.l2_normalize(rng.standard_normal((500, 16)))
  neighbors, scores, params = retrieval.nearest_neighbors(emb, 10)
  assert params['kind'] == 'brute_force'
  sims = emb @ emb.T
  np.fill_diagonal(sims, -np.inf)
  exact = np.argsort(-sims, axis=1)[:, :10]
  np.testing.assert_array_equal(neighbors, exact)
  np.testing.assert_allclose(scores, np.take_along_axis(sims, exact, 1), atol=1e-5)
  assert (neighbors != np.arange(500)[:, None]).all()


def test_large_data_uses_a_partitioned_index_with_sqrt_leaves():
  params = retrieval.scann_params(1_281_167, 100)
  assert params['kind'] == 'tree_ah' and params['num_leaves'] == 1131 and params['reorder'] >= 100
  with pytest.raises(ValueError, match='num_neighbors=5'):
    retrieval.nearest_neighbors(np.eye(5, dtype=np.float32), 5)


def test_official_plan_takes_first_unused_neighbours_in_rank_order():
  # Row i's neighbour list; anchors visited in the order the rng gives.
  neighbors = np.array([[1, 2, 3], [0, 2, 4], [3, 0, 1], [2, 4, 0], [3, 1, 0], [4, 3, 2]])

  class FixedOrder:
    def permutation(self, n):
      return np.array([1, 0, 5, 2, 3, 4])

  groups = grouping.official_epoch_plan(neighbors, 3, FixedOrder())
  # anchor 1 takes 0, 2; anchor 0 is used; anchor 5 takes 4, 3; the rest are used.
  np.testing.assert_array_equal(groups, [[1, 0, 2], [5, 4, 3]])


def test_official_plan_groups_are_disjoint_and_short_anchors_stay_single():
  rng = np.random.default_rng(1)
  emb = retrieval.l2_normalize(rng.standard_normal((200, 8)))
  neighbors, _, _ = retrieval.nearest_neighbors(emb, 6)
  groups = grouping.official_epoch_plan(neighbors, 4, np.random.default_rng(2))
  flat = groups.reshape(-1)
  assert len(np.unique(flat)) == len(flat)  # disjoint within the epoch
  for anchor, *members in groups:
    assert set(members) <= set(neighbors[anchor])
    ranks = [list(neighbors[anchor]).index(m) for m in members]
    assert ranks == sorted(ranks)  # rank order
  assert 0 < len(groups) * 4 < 200  # some anchors ran out of unused neighbours


def test_class_and_random_groupings():
  labels = np.repeat(np.arange(5), 10)
  groups = grouping.class_groups(labels, 4, np.random.default_rng(0))
  assert groups.shape == (10, 4) and all(len(set(labels[g])) == 1 for g in groups)
  rand = grouping.random_groups(50, 4, np.random.default_rng(0))
  assert rand.shape == (12, 4) and len(np.unique(rand)) == 48
