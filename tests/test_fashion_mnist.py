"""Fashion-MNIST source: the IDX reader, the error without the package, the batches (IDX files written here)."""

import gzip
import struct

import numpy as np
import pytest

from configs import fashion_mnist as fashion_config
from groupdiff_jax import errors, step_plan, train
from groupdiff_jax.data import fashion_mnist


def write_idx(path, array, compress=True):
  codes = {np.dtype(np.uint8): 0x08, np.dtype('>i4'): 0x0C}
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  data = header + array.tobytes()
  if compress:
    with gzip.open(path, 'wb') as f:
      f.write(data)
  else:
    with open(path, 'wb') as f:
      f.write(data)


def write_split(folder, split, count, seed=0, compress=True):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
  labels = (np.arange(count) % 10).astype(np.uint8)
  stems = fashion_mnist.FILES[split]
  suffix = '.gz' if compress else ''
  write_idx(folder / (stems[0] + suffix), images, compress)
  write_idx(folder / (stems[1] + suffix), labels, compress)
  return images, labels


@pytest.mark.parametrize('compress', [True, False])
def test_read_idx_returns_the_written_array(tmp_path, compress):
  array = np.arange(2 * 3 * 4, dtype='>i4').reshape(2, 3, 4)
  path = tmp_path / ('a.idx.gz' if compress else 'a.idx')
  write_idx(path, array, compress)
  out = fashion_mnist.read_idx(path)
  assert out.shape == (2, 3, 4) and (out == array).all()


def test_corrupt_or_truncated_idx_is_a_data_error(tmp_path):
  (tmp_path / 'bad').write_bytes(b'\x01\x02\x08\x01' + b'\x00' * 8)
  with pytest.raises(errors.DataError, match='not an IDX file'):
    fashion_mnist.read_idx(tmp_path / 'bad')
  write_idx(tmp_path / 'ok', np.zeros((4, 5), np.uint8), compress=False)
  (tmp_path / 'short').write_bytes((tmp_path / 'ok').read_bytes()[:-3])
  with pytest.raises(errors.DataError, match='truncated'):
    fashion_mnist.read_idx(tmp_path / 'short')


def test_missing_dataset_names_the_apt_command(tmp_path):
  with pytest.raises(errors.MissingInputError, match='apt-get install -y dataset-fashion-mnist') as info:
    fashion_mnist.read_split(str(tmp_path), 'train')
  assert 'data.data_dir' in str(info.value) and str(tmp_path) in str(info.value)


def test_images_are_padded_to_32_and_averaged_to_16(tmp_path):
  images, labels = write_split(tmp_path, 'test', 12, compress=False)
  x32, y = fashion_mnist.load_split(str(tmp_path), 'test', 32)
  assert x32.shape == (12, 32, 32, 1) and (y == labels).all()
  assert (x32[:, :2] == -1).all() and (x32[:, :, -2:] == -1).all()  # black border
  np.testing.assert_allclose(x32[:, 2:30, 2:30, 0], images / 127.5 - 1, rtol=0, atol=1e-6)
  x16, _ = fashion_mnist.load_split(str(tmp_path), 'test', 16)
  np.testing.assert_allclose(x16[3, 5, 7, 0], x32[3, 10:12, 14:16, 0].mean(), rtol=0, atol=1e-6)
  with pytest.raises(errors.ConfigError, match='image_size=20'):
    fashion_mnist.load_split(str(tmp_path), 'test', 20)


@pytest.mark.parametrize('grouping', ['class', 'official_plan'])
def test_trainer_batches_of_the_default_mixed_step(tmp_path, grouping):
  images, labels = write_split(tmp_path, 'train', 200)
  config = fashion_config.get_config()
  config.data.data_dir = str(tmp_path)
  config.data.grouping = grouping
  config.train.batch_size = 32
  kinds = step_plan.step_kinds(config.train.batch_size, 4, config.train.group_ratio)
  (kind,) = kinds.values()
  batch = train.make_batches(config).batch(0, kind)
  singles, groups = batch
  assert singles['images'].shape == (28, 32, 32, 1) and groups['images'].shape == (4, 32, 32, 1)
  if grouping == 'class':  # a group is one class
    assert len(set(groups['labels'].tolist())) == 1


def test_probe_groups_are_nearest_neighbours_same_class_and_random():
  from groupdiff_jax.evaluation import group_branch_probe
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10), 20)
  embeddings = rng.standard_normal((200, 8))
  groups = group_branch_probe.probe_groups(labels, embeddings, 6, 4, seed=1)
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  for g in groups['similarity'].reshape(6, 4):
    scores = unit @ unit[g[0]]
    scores[g[0]] = -np.inf
    assert set(g[1:]) == set(np.argsort(-scores)[:3])
  for g in groups['class'].reshape(6, 4):
    assert len(set(labels[g].tolist())) == 1 and len(set(g.tolist())) == 4
  assert len(set(groups['random'].tolist())) == 24
