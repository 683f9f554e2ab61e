"""The toy-shapes scorer (evaluation/toy_features.py) on tiny data."""

import jax
import numpy as np
import pytest

from groupdiff_jax import errors
from groupdiff_jax.data import toy_shapes
from groupdiff_jax.evaluation import fid, toy_features

EASY_CLASSES = (toy_shapes.SHAPES.index('disc'), toy_shapes.SHAPES.index('bar'))


def two_class_shapes(count, seed):
  """Toy shapes of EASY_CLASSES only (a disc or a horizontal bar): about count / 5 images."""
  images, labels, attributes = toy_shapes.make_shapes(count, seed)
  keep = np.isin(labels, EASY_CLASSES)
  return images[keep], labels[keep], attributes[keep]


def test_featurize_returns_float64_features_and_classes_for_any_count():
  images, labels, attributes = toy_shapes.make_shapes(10, seed=0)
  params = toy_features.train_feature_net(images, labels, attributes, steps=1, batch_size=4)
  features, predicted = toy_features.make_featurizer(params, batch_size=4)(images)  # 3 batches, the last short
  assert features.shape == (10, toy_features.FEATURES) and features.dtype == np.float64
  assert predicted.shape == (10,) and np.issubdtype(predicted.dtype, np.integer)
  assert predicted.min() >= 0 and predicted.max() < toy_shapes.NUM_CLASSES


def test_training_is_a_pure_function_of_the_seed():
  images, labels, attributes = toy_shapes.make_shapes(20, seed=0)
  train = lambda seed: toy_features.train_feature_net(images, labels, attributes, steps=2, seed=seed, batch_size=8)
  first, again, other = train(0), train(0), train(1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(first),
                                                      jax.tree_util.tree_leaves(other)))


def test_a_briefly_trained_net_separates_two_easy_classes_on_held_out_images():
  images, labels, attributes = two_class_shapes(500, seed=0)
  held_images, held_labels, _ = two_class_shapes(1000, seed=1)
  params = toy_features.train_feature_net(images, labels, attributes, steps=60, batch_size=32)
  featurize = toy_features.make_featurizer(params)
  reference = fid.FIDStatistics.from_features(featurize(images)[0])
  real = toy_features.evaluate_real(featurize, held_images, held_labels, reference)
  # A net that ignores the image is right at most as often as the commoner class occurs, p; over n
  # images its accuracy has std <= sqrt(p (1 - p) / n). Ask for 4 such stds above p (a net at chance
  # passes with probability < 4e-5).
  n = len(held_labels)
  p = max(np.mean(held_labels == c) for c in EASY_CLASSES)
  assert real['accuracy'] > p + 4 * np.sqrt(p * (1 - p) / n), (real, p, n)
  assert np.isfinite(real['fd']) and real['fd'] >= 0


def test_score_samples_reads_uint8_images_as_evaluate_real_reads_floats():
  images, labels, attributes = toy_shapes.make_shapes(30, seed=0)
  featurize = toy_features.make_featurizer(
      toy_features.train_feature_net(images, labels, attributes, steps=1, batch_size=8))
  reference = fid.FIDStatistics.from_features(featurize(images)[0])
  as_uint8 = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  real = toy_features.evaluate_real(featurize, images, labels, reference)
  scores = toy_features.score_samples(featurize, as_uint8, labels, reference)
  assert scores == {'fd': real['fd'], 'class_accuracy': real['accuracy']}


def test_user_mistakes_raise_one_clear_error():
  images, labels, attributes = toy_shapes.make_shapes(10, seed=0)
  with pytest.raises(errors.UserError, match='at least 1 training step'):
    toy_features.train_feature_net(images, labels, attributes, steps=0)
  with pytest.raises(errors.UserError, match='batch_size=11'):
    toy_features.train_feature_net(images, labels, attributes, steps=1, batch_size=11)
  params = toy_features.train_feature_net(images, labels, attributes, steps=1, batch_size=4)
  with pytest.raises(errors.UserError, match=r'\[M, S, S, 3\]'):
    toy_features.make_featurizer(params)(images[..., 0])
