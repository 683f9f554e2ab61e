"""The embedded demo's data: scikit-learn's bundled 8x8 digits.

1,797 greyscale digits (10 classes) ship with scikit-learn, so the demo runs
on a fresh machine without downloads. Images are upsampled to 16x16 and
scaled to [-1, 1]; the model sees them directly (no VAE). Groups come from
ScaNN neighbour lists over a simple embedding (PCA of the pixels,
L2-normalised), grouped with the official epoch plan.

`DigitsBatches.batch(step, kind)` is a pure function of (seed, step): a
resumed run sees exactly the batches an uninterrupted one would.
"""

import functools
import logging

import numpy as np

from groupdiff_jax.data import grouping, retrieval

NUM_CLASSES = 10


def load_digits(image_size=16):
  """Images float32 [1797, S, S, 1] in [-1, 1] and labels int32 [1797]."""
  from sklearn.datasets import load_digits as sklearn_digits
  import jax
  digits = sklearn_digits()
  images = digits.images.astype(np.float32) / 16.0  # [M, 8, 8] in [0, 1]
  images = np.asarray(jax.image.resize(images, (len(images), image_size, image_size), 'linear'))
  return (images[..., None] * 2.0 - 1.0).astype(np.float32), digits.target.astype(np.int32)


def pca_embeddings(images, dims=32):
  """L2-normalised PCA projection of the flattened images: [M, dims]."""
  flat = images.reshape(len(images), -1).astype(np.float64)
  centred = flat - flat.mean(0)
  _, _, components = np.linalg.svd(centred, full_matrices=False)
  return retrieval.l2_normalize(centred @ components[:dims].T)


class DigitsBatches:
  """Batches of the step kinds in step_plan, drawn from the digits."""

  def __init__(self, config, seed):
    self.images, self.labels = load_digits(config.image_size)
    self.seed = seed
    self.grouping = config.grouping
    self.batch_size = config.batch_size
    self.neighbors = None
    if self.grouping == 'official_plan':
      self.neighbors, self.scores, _ = retrieval.nearest_neighbors(
          pca_embeddings(self.images, config.embedding_dims), config.num_neighbors)
      same_class = (self.labels[self.neighbors[:, :3]] == self.labels[:, None]).mean()
      logging.info('Digits: %d images; %.1f%% of the 3 nearest neighbours share the anchor\'s class.',
                   len(self.images), 100 * same_class)
    elif self.grouping not in ('class', 'random'):
      raise ValueError(f"Unknown data.grouping={self.grouping!r}; use 'official_plan', 'class' or 'random'.")

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
    """One dict per SubBatch of `kind`: images [n, S, S, 1], labels [n]."""
    out = []
    for part, sub in enumerate(kind):
      index = self.indices(step, sub, part)
      out.append({'images': self.images[index], 'labels': self.labels[index]})
    return tuple(out)
