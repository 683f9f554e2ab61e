"""The embedded demo's data: scikit-learn's bundled 8x8 digits.

1,797 greyscale digits (10 classes) ship with scikit-learn, so the demo runs
on a fresh machine without downloads. Images are upsampled to 16x16 and
scaled to [-1, 1]; the model sees them directly (no VAE). Groups come from
ScaNN neighbour lists over a simple embedding (PCA of the pixels,
L2-normalised), grouped with the official epoch plan.

`DigitsBatches(config, seed).batch(step, kind)` (data/array_batches.py) is a pure function of (seed, step): a
resumed run sees exactly the batches an uninterrupted one would.
"""

import numpy as np
from absl import logging

from groupdiff_jax.data.array_batches import ArrayBatches, neighbor_lists, pca_embeddings

NUM_CLASSES = 10


def load_digits(image_size=16):
  """Images float32 [1797, S, S, 1] in [-1, 1] and labels int32 [1797]."""
  from sklearn.datasets import load_digits as sklearn_digits
  import jax
  digits = sklearn_digits()
  images = digits.images.astype(np.float32) / 16.0  # [M, 8, 8] in [0, 1]
  images = np.asarray(jax.image.resize(images, (len(images), image_size, image_size), 'linear'))
  return (images[..., None] * 2.0 - 1.0).astype(np.float32), digits.target.astype(np.int32)


def DigitsBatches(config, seed):  # pylint: disable=invalid-name  (a factory named like the class it returns)
  """ArrayBatches over the digits of a run's `config` (config.data; train.batch_size, train.group_size)."""
  data = config.data
  images, labels = load_digits(data.image_size)
  neighbors = None
  if data.grouping == 'official_plan':
    neighbors = neighbor_lists(pca_embeddings(images, data.embedding_dims), data.num_neighbors)
    same_class = (labels[neighbors[:, :3]] == labels[:, None]).mean()
    logging.info('Digits: %d images; %.1f%% of the 3 nearest neighbours share the anchor\'s class.',
                 len(images), 100 * same_class)
  return ArrayBatches(images, labels, data.grouping, config.train.batch_size, seed, neighbors,
                      config.train.group_size)
