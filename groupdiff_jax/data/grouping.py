"""Building groups of related images from neighbour lists.

`official_epoch_plan` is the official GroupDiff grouping: once per epoch,
anchors in shuffled order each take the first N-1 neighbours, in rank
order, that are not yet used this epoch; groups are disjoint, and an anchor
with too few unused neighbours stays a single. `class_groups` and
`random_groups` are the ablation groupings (no neighbour lists needed).
"""

import numpy as np


def official_epoch_plan(neighbors, group_size, rng):
  """Disjoint groups for one epoch.

  Args:
    neighbors: int [M, K] neighbour lists, best first, self excluded.
    group_size: N.
    rng: numpy Generator (the epoch's shuffle).

  Returns:
    int32 [num_groups, N]: column 0 is the anchor, then its neighbours in
    rank order. Images in no group are left out (they remain singles).
  """
  num_rows = neighbors.shape[0]
  used = np.zeros(num_rows, bool)
  groups = []
  for anchor in rng.permutation(num_rows):
    if used[anchor]:
      continue
    candidates = neighbors[anchor]
    members = candidates[~used[candidates]][:group_size - 1]
    if len(members) < group_size - 1:
      continue
    used[anchor] = True
    used[members] = True
    groups.append(np.concatenate([[anchor], members]))
  return np.asarray(groups, np.int32).reshape(-1, group_size)


def class_groups(labels, group_size, rng):
  """Disjoint groups of N images of one class (shuffled within each class)."""
  groups = []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    whole = len(members) // group_size * group_size
    groups.append(members[:whole].reshape(-1, group_size))
  groups = np.concatenate(groups)
  return groups[rng.permutation(len(groups))].astype(np.int32)


def random_groups(num_rows, group_size, rng):
  """Disjoint groups of N images drawn at random."""
  order = rng.permutation(num_rows)
  whole = num_rows // group_size * group_size
  return order[:whole].reshape(-1, group_size).astype(np.int32)
