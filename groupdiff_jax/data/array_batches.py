"""Batches of the trainer's step kinds from in-memory image arrays.

The small datasets (the digits demo, the toy shapes of experiments/table1.py)
live in memory. `ArrayBatches.batch(step, kind)` serves one dict per
`step_plan.SubBatch` of `kind` and is a pure function of (seed, step): a
resumed run sees exactly the batches an uninterrupted one would. Groups
follow data.grouping: 'official_plan' (similarity: the official epoch plan
over neighbour lists), 'class' or 'random'. ImageNet latents go through
data/pipeline.py instead.
"""

import functools

import numpy as np

from groupdiff_jax import errors
from groupdiff_jax.data import grouping, retrieval

GROUPINGS = ('official_plan', 'class', 'random')


def neighbor_lists(embeddings, num_neighbors):
  """int32 [M, K] nearest-neighbour lists (self excluded) of an in-memory dataset's `embeddings` [M, D].

  K = data.num_neighbors must be below the dataset's M images: a ConfigError
  naming both, not the retrieval library's error.
  """
  if not 0 < num_neighbors < len(embeddings):
    raise errors.ConfigError(f'data.num_neighbors={num_neighbors} must be between 1 and {len(embeddings) - 1} for '
                             f'a dataset of {len(embeddings)} images; lower it (or raise data.num_images where the '
                             f'dataset has it).')
  neighbors, _, _ = retrieval.nearest_neighbors(embeddings, num_neighbors)
  return np.asarray(neighbors)


def pca_embeddings(images, dims=32, dtype=np.float64):
  """L2-normalised PCA projection of the flattened images: [M, dims] of `dtype`
  (the projection is cast before normalising)."""
  flat = images.reshape(len(images), -1).astype(np.float64)
  centred = flat - flat.mean(0)
  _, _, components = np.linalg.svd(centred, full_matrices=False)
  return retrieval.l2_normalize((centred @ components[:dims].T).astype(dtype))


class ArrayBatches:
  """Batches of the step kinds in step_plan from in-memory arrays.

  Args:
    images: [M, H, W, C] float32 in [-1, 1].
    labels: int32 [M].
    grouping: one of GROUPINGS.
    batch_size: images per step.
    seed: the run's seed; `batch(step, kind)` is a pure function of it and
      the step.
    neighbors: int32 [M, K] neighbour lists (self excluded, best first);
      needed for 'official_plan'.
    group_size: the run's train.group_size, checked against K (None: not
      checked).
  """

  def __init__(self, images, labels, grouping_name, batch_size, seed, neighbors=None, group_size=None):
    if grouping_name not in GROUPINGS:
      raise errors.ConfigError(f'Unknown data.grouping={grouping_name!r}; use one of {GROUPINGS}.')
    if grouping_name == 'official_plan' and neighbors is None:
      raise errors.ConfigError("data.grouping='official_plan' needs neighbour lists.")
    if group_size is not None and neighbors is not None and group_size - 1 > np.shape(neighbors)[1]:
      raise errors.ConfigError(f'train.group_size={group_size} needs {group_size - 1} neighbours per image but the '
                               f'dataset\'s lists hold K={np.shape(neighbors)[1]}; lower train.group_size or raise '
                               f'the number of neighbours (data.num_neighbors where the dataset has it).')
    self.images, self.labels = images, labels
    self.grouping, self.batch_size, self.seed = grouping_name, batch_size, seed
    self.neighbors = neighbors

  @property
  def steps_per_epoch(self):
    return max(1, len(self.images) // self.batch_size)

  @functools.lru_cache(maxsize=2)
  def groups(self, epoch, group_size):
    """The epoch's disjoint groups: int32 [num_groups, group_size]."""
    rng = np.random.default_rng([self.seed, epoch, group_size])
    if self.grouping == 'official_plan':
      return grouping.official_epoch_plan(self.neighbors, group_size, rng)
    if self.grouping == 'class':
      return grouping.class_groups(self.labels, group_size, rng)
    return grouping.random_groups(len(self.images), group_size, rng)

  def indices(self, step, sub, part):
    rng = np.random.default_rng([self.seed, step, part])
    if sub.group_size == 1:
      return rng.choice(len(self.images), sub.num_images, replace=False)
    groups = self.groups(step // self.steps_per_epoch, sub.group_size)
    return groups[rng.choice(len(groups), sub.num_groups, replace=False)].reshape(-1)

  def batch(self, step, kind):
    """One dict per SubBatch of `kind`: images [n, H, W, C], labels [n]."""
    out = []
    for part, sub in enumerate(kind):
      index = self.indices(step, sub, part)
      out.append({'images': self.images[index], 'labels': self.labels[index]})
    return tuple(out)
