"""Fashion-MNIST from its IDX files (the Debian package `dataset-fashion-mnist`).

  apt-get install -y dataset-fashion-mnist   # /usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz

60,000 training and 10,000 test greyscale 28x28 images of 10 clothing
classes. `read_idx` parses the IDX format (gzipped or not) with NumPy;
`load_split` returns float32 images in [-1, 1] at `image_size`: 32 pads the
28x28 image by 2 pixels of background on every side (native resolution; a
patch of 4 gives 64 tokens), 16 is the padded image averaged over 2x2
pixels, 28 is the image as stored. `FashionBatches(config, seed)` serves
the trainer's step kinds (data/array_batches.py); similarity groups come
from `data.neighbors_dir` (the neighbour job's `neighbors.npy` over the
training split, e.g. a learned encoder's embeddings) or, when it is empty,
from ScaNN over the pixels' PCA (data.embedding_dims).
"""

import gzip
import os

import numpy as np
from absl import logging

from groupdiff_jax import errors
from groupdiff_jax.data.array_batches import ArrayBatches, neighbor_lists, pca_embeddings

NUM_CLASSES = 10
DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
APT_COMMAND = 'apt-get install -y dataset-fashion-mnist'
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
         'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
               'Ankle boot')
IMAGE_SIZES = (16, 28, 32)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def _find(folder, stem):
  for name in (stem + '.gz', stem):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      return path
  return None


def read_idx(path):
  """The array of an IDX file (gzipped when its name ends in .gz): magic 0 0 dtype ndim, ndim big-endian sizes."""
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise errors.DataError(f'{path} is not an IDX file (magic bytes {data[:4]!r}); reinstall it: {APT_COMMAND}')
  ndim = data[3]
  shape = tuple(int(s) for s in np.frombuffer(data, '>u4', ndim, 4))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(shape)) * dtype.itemsize:
    raise errors.DataError(f'{path}: {len(data) - offset} bytes of data for shape {shape} of {dtype}; the file is '
                           f'truncated or corrupt; reinstall it: {APT_COMMAND}')
  return np.frombuffer(data, dtype, offset=offset).reshape(shape)


def read_split(folder, split):
  """(uint8 images [M, 28, 28], int32 labels [M]) of 'train' or 'test' from `folder`."""
  folder = folder or DEFAULT_DIR
  paths = [_find(folder, stem) for stem in FILES[split]]
  if None in paths:
    missing = [f'{stem}(.gz)' for stem, p in zip(FILES[split], paths) if p is None]
    raise errors.MissingInputError(f'Fashion-MNIST {split} files {missing} are not in {folder}: install them with '
                                   f'`{APT_COMMAND}` or point --config.data.data_dir at a folder that holds them.')
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise errors.DataError(f'{paths[0]} ({images.shape}) and {paths[1]} ({labels.shape}) are not images [M, H, W] '
                           f'with one label each.')
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise errors.DataError(f'{paths[1]}: labels outside 0..{NUM_CLASSES - 1}.')
  return images, labels.astype(np.int32)


def to_model_images(images_uint8, image_size=32):
  """uint8 [M, 28, 28] -> float32 [M, S, S, 1] in [-1, 1] (S = 32: padded; 16: padded, 2x2 means; 28: as is)."""
  if image_size not in IMAGE_SIZES:
    raise errors.ConfigError(f'data.image_size={image_size} for fashion_mnist; use one of {IMAGE_SIZES}.')
  x = images_uint8.astype(np.float32) / 127.5 - 1.0
  if image_size != 28:
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)  # background is 0 (black)
  if image_size == 16:
    x = x.reshape(len(x), 16, 2, 16, 2).mean(axis=(2, 4))
  return x[..., None]


def load_split(folder, split, image_size=32):
  """(float32 images [M, S, S, 1] in [-1, 1], int32 labels [M])."""
  images, labels = read_split(folder, split)
  return to_model_images(images, image_size), labels


def load_neighbors(neighbors_dir, num_images):
  path = os.path.join(neighbors_dir, 'neighbors.npy')
  if not os.path.exists(path):
    raise errors.MissingInputError(f'data.neighbors_dir={neighbors_dir!r} holds no neighbors.npy; write it with '
                                   f'python -m groupdiff_jax.data.neighbors_job --embeddings_dir=... '
                                   f'--output_dir={neighbors_dir}.')
  neighbors = np.load(path)
  if neighbors.ndim != 2 or len(neighbors) != num_images:
    raise errors.DataError(f'{path} has shape {neighbors.shape}; the training split has {num_images} images.')
  return neighbors


def FashionBatches(config, seed):  # pylint: disable=invalid-name  (a factory named like the class it returns)
  """ArrayBatches over the Fashion-MNIST training split of a run's `config` (config.data; train.batch_size,
  train.group_size)."""
  data = config.data
  images, labels = load_split(data.data_dir or DEFAULT_DIR, 'train', data.image_size)
  neighbors = None
  if data.grouping == 'official_plan':
    if data.neighbors_dir:
      neighbors = load_neighbors(data.neighbors_dir, len(images))
    else:
      neighbors = neighbor_lists(pca_embeddings(images, data.embedding_dims, np.float32), data.num_neighbors)
    purity = (labels[neighbors[:, :3]] == labels[:, None]).mean()
    logging.info('Fashion-MNIST: %d images; %.1f%% of the 3 nearest neighbours share the anchor\'s class.',
                 len(images), 100 * purity)
  return ArrayBatches(images, labels, data.grouping, config.train.batch_size, seed, neighbors,
                      config.train.group_size)
