"""Tests of the ADM-protocol evaluator: FID, IS, precision/recall, Inception graph, CLI.

The real Inception graph cannot be downloaded here, so a small stand-in TF1
graph with the same tensor names (`ExpandDims:0` in, `pool_3:0`,
`mixed_6/conv:0`, `softmax/logits/MatMul`; smaller dimensions so sqrtm stays
fast) exercises the real loading, batching and evaluator code.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from groupdiff_jax.evaluation import evaluator
from groupdiff_jax.evaluation import fid
from groupdiff_jax.evaluation import inception
from groupdiff_jax.evaluation import precision_recall as pr

POOL_DIM, SPATIAL_CHANNELS, NUM_CLASSES = 16, 8, 10


# ---------------------------------------------------------------------- FID


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  s1, s2 = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_a_gaussian_to_itself_is_zero_and_symmetric():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) * 1.5 + 0.3
  (mu_a, s_a), (mu_b, s_b) = fid.feature_statistics(a), fid.feature_statistics(b)
  assert fid.frechet_distance(mu_a, s_a, mu_a, s_a) == pytest.approx(0, abs=1e-9)
  assert fid.frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(
      fid.frechet_distance(mu_b, s_b, mu_a, s_a), rel=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='Means'):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_match_numpy():
  x = np.random.default_rng(2).normal(size=(50, 7)).astype(np.float32)
  mu, sigma = fid.feature_statistics(x)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_fid_statistics_round_trip_with_adm_keys(tmp_path):
  rng = np.random.default_rng(3)
  stats = fid.FIDStatistics.from_features(rng.normal(size=(20, 4)), rng.normal(size=(20, 3)))
  path = str(tmp_path / 'ref.npz')
  stats.save(path)
  assert sorted(np.load(path).files) == ['mu', 'mu_s', 'sigma', 'sigma_s']
  loaded = fid.FIDStatistics.load(path)
  for key in ('mu', 'sigma', 'mu_s', 'sigma_s'):
    np.testing.assert_array_equal(getattr(loaded, key), getattr(stats, key))
  assert loaded.fid(stats) == pytest.approx(0, abs=1e-9)
  np.savez(str(tmp_path / 'none.npz'), arr_0=np.zeros(3))
  assert fid.maybe_load(str(tmp_path / 'none.npz')) is None
  with pytest.raises(ValueError, match='mu'):
    fid.FIDStatistics.load(str(tmp_path / 'none.npz'))


# ----------------------------------------------------------- Inception Score


def test_inception_score_of_identical_predictions_is_one():
  probs = np.full([40, 10], 0.1)
  assert inception.inception_score(probs) == pytest.approx(1.0)


def test_inception_score_of_confident_even_predictions_is_num_classes():
  probs = np.eye(8)[np.arange(64) % 8]  # one-hot, each class 8 times
  assert inception.inception_score(probs) == pytest.approx(8.0)


def test_inception_score_averages_splits_of_split_size():
  # First split all class 0 (IS 1), second split spread over 4 classes (IS 4).
  probs = np.concatenate([np.eye(4)[np.zeros(8, int)], np.eye(4)[np.arange(8) % 4]])
  assert inception.inception_score(probs, split_size=8) == pytest.approx(2.5)
  # One split: class 0 has 10 of 16 samples, classes 1-3 two each; KL = -log p(y).
  assert inception.inception_score(probs, split_size=16) == pytest.approx(
      np.exp(10 / 16 * np.log(16 / 10) + 6 / 16 * np.log(16 / 2)))


# --------------------------------------------------------- precision/recall


def _brute_force_pr(ref, sample, k=3):
  def sq(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
  r_ref = np.sort(sq(ref, ref), axis=1)[:, k]
  r_sample = np.sort(sq(sample, sample), axis=1)[:, k]
  d = sq(ref, sample)  # [N1, N2]
  return (d <= r_ref[:, None]).any(0).mean(), (d <= r_sample[None, :]).any(1).mean()


def test_manifold_radii_is_kth_neighbour_squared_distance():
  points = np.array([[0.], [1.], [2.], [3.], [10.]])
  radii = pr.manifold_radii(points, k=3, precision='float32')
  np.testing.assert_allclose(radii, [9, 4, 4, 9, 81])  # 3rd of the sorted others


def test_precision_recall_identical_sets_are_one():
  x = np.random.default_rng(4).normal(size=(50, 8))
  assert pr.precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_far_apart_clusters_are_zero():
  rng = np.random.default_rng(5)
  ref, sample = rng.normal(size=(30, 8)), rng.normal(size=(40, 8)) + 100.0
  assert pr.precision_recall(ref, sample) == (0.0, 0.0)


def test_precision_counts_samples_inside_the_reference_manifold():
  rng = np.random.default_rng(6)
  ref = rng.normal(size=(40, 4))
  sample = np.concatenate([ref[:10], rng.normal(size=(10, 4)) + 50.0])  # half on, half off
  precision, _ = pr.precision_recall(ref, sample)
  assert precision == 0.5


@pytest.mark.parametrize('precision', ['float32', 'adm_float16'])
def test_blocked_precision_recall_matches_brute_force(precision):
  rng = np.random.default_rng(7)
  ref, sample = rng.normal(size=(37, 6)), rng.normal(size=(29, 6)) * 1.3 + 0.2
  expected = _brute_force_pr(ref, sample)
  got = pr.precision_recall(ref, sample, row_batch_size=8, col_batch_size=5, precision=precision)
  np.testing.assert_allclose(got, expected)
  assert 0 < got[0] < 1 and 0 < got[1] < 1


# ------------------------------------------------------ stand-in Inception


def _build_standin_graph(path):
  """A tiny frozen graph with the ADM tensor names (smaller dimensions)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  v1 = tf.compat.v1
  rng = np.random.default_rng(8)
  graph = tf.Graph()
  with graph.as_default():
    jpeg = v1.placeholder(tf.uint8, [None, None, 3], name='DecodeJpeg')  # as the real graph
    x = tf.expand_dims(tf.cast(jpeg, tf.float32, name='Cast'), 0, name='ExpandDims')
    x = v1.image.resize_bilinear(x, [12, 12], name='ResizeBilinear')  # real graph: 299x299
    x = (x - 128.0) / 128.0
    with tf.name_scope('mixed_6'):
      w1 = tf.constant(rng.normal(size=(3, 3, 3, SPATIAL_CHANNELS)), tf.float32)
      spatial = tf.nn.conv2d(x, w1, strides=[1, 6, 6, 1], padding='SAME', name='conv')  # [N, 2, 2, 8]
    w2 = tf.constant(rng.normal(size=(1, 1, SPATIAL_CHANNELS, POOL_DIM)), tf.float32)
    h = tf.nn.relu(tf.nn.conv2d(tf.nn.relu(spatial), w2, strides=[1, 1, 1, 1], padding='SAME'))
    pool = tf.reduce_mean(h, axis=[1, 2], keepdims=True, name='pool_3')  # [N, 1, 1, POOL_DIM]
    with tf.name_scope('softmax'), tf.name_scope('logits'):
      w3 = tf.constant(rng.normal(size=(POOL_DIM, NUM_CLASSES)), tf.float32)
      logits = tf.matmul(tf.reshape(pool, [-1, POOL_DIM]), w3, name='MatMul') + 1.0
    tf.nn.softmax(logits, name='softmax')
  with open(path, 'wb') as f:
    f.write(graph.as_graph_def().SerializeToString())
  return graph


@pytest.fixture(scope='module')
def graph_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('inception') / 'standin_graph_def.pb')
  _build_standin_graph(path)
  return path


def _images(n, seed, size=8):
  return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_inception_features_are_adm_tensors_and_independent_of_batching(graph_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = _images(10, 9)
  with inception.InceptionV3(graph_path, batch_size=3) as net:
    pool, spatial = net.features(images)
    probs = net.softmax(pool, batch_size=4)
  with inception.InceptionV3(graph_path, batch_size=64) as net:
    pool_64, spatial_64 = net.features(iter([images[:6], images[6:]]))
  assert pool.shape == (10, POOL_DIM) and spatial.shape == (10, 2 * 2 * 7)
  np.testing.assert_allclose(pool, pool_64, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(spatial, spatial_64, rtol=1e-5, atol=1e-6)
  # Direct run of the graph: spatial = mixed_6/conv[..., :7] flattened (H, W, C);
  # softmax = pool @ W without the bias, as ADM.
  graph = tf.Graph()
  with graph.as_default():
    batch = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
    tf.import_graph_def(inception.load_graph_def(graph_path), input_map={'ExpandDims:0': batch},
                        name='')
    with tf.compat.v1.Session(graph=graph) as sess:
      conv, w = sess.run(['mixed_6/conv:0', 'softmax/logits/Const:0'],
                         {batch: images.astype(np.float32)})
  np.testing.assert_allclose(spatial, conv[..., :7].reshape(10, -1), rtol=1e-5, atol=1e-6)
  logits = pool @ w
  expected = np.exp(logits - logits.max(1, keepdims=True))
  np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_inception_errors_say_what_is_wrong(graph_path, tmp_path):
  with pytest.raises(FileNotFoundError, match='openaipublic'):
    inception.InceptionV3(str(tmp_path / 'missing.pb'))
  with inception.InceptionV3(graph_path) as net:
    with pytest.raises(ValueError, match='uint8'):
      net.features(np.zeros([2, 8, 8, 3], np.float32))
  with pytest.raises(ValueError, match='lacks a tensor'):
    inception.InceptionV3(graph_path, spec=inception.GraphSpec(pool_tensor='pool_9:0'))


def test_importing_the_evaluator_does_not_import_tensorflow():
  code = ('import sys, groupdiff_jax.evaluation.evaluator, groupdiff_jax.evaluation.s_cross; '
          'sys.exit("tensorflow" in sys.modules)')
  assert subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))).returncode == 0


# ----------------------------------------------------------------- evaluator


def test_open_images_streams_batches_from_plain_and_compressed_npz(tmp_path):
  images = _images(11, 10)
  for save in (np.savez, np.savez_compressed):
    path = str(tmp_path / f'{save.__name__}.npz')
    save(path, arr_0=images, arr_1=np.arange(11))
    view = evaluator.open_images(path)
    assert len(view) == 11 and view.shape == images.shape
    np.testing.assert_array_equal(np.concatenate(list(view.batches(4))), images)


def test_open_images_errors_name_file_key_and_fix(tmp_path):
  bad_dtype = str(tmp_path / 'float.npz')
  np.savez(bad_dtype, arr_0=np.zeros([4, 8, 8, 3], np.float32))
  with pytest.raises(ValueError, match=r'float\.npz: arr_0 must be uint8.*float32.*np\.savez'):
    evaluator.open_images(bad_dtype)
  no_key = str(tmp_path / 'nokey.npz')
  np.savez(no_key, images=_images(4, 0))
  with pytest.raises(ValueError, match=r"no array 'arr_0' \(it has \['images'\]\)"):
    evaluator.open_images(no_key)
  not_npz = str(tmp_path / 'x.npz')
  with open(not_npz, 'w') as f:
    f.write('hello')
  with pytest.raises(ValueError, match='not an .npz'):
    evaluator.open_images(not_npz)
  with pytest.raises(FileNotFoundError):
    evaluator.open_images(str(tmp_path / 'absent.npz'))


def test_evaluator_end_to_end_with_standin_graph(graph_path, tmp_path, caplog):
  ref_images, sample_images = _images(96, 11), _images(80, 12)
  ref, same, samples = (str(tmp_path / f'{n}.npz') for n in ('ref', 'same', 'samples'))
  np.savez(ref, arr_0=ref_images)
  np.savez(same, arr_0=ref_images)
  np.savez(samples, arr_0=sample_images, arr_1=np.zeros(80, np.int64))
  caplog.set_level(logging.INFO)
  identical = evaluator.evaluate(ref, same, graph_path, batch_size=32)
  assert identical['fid'] == pytest.approx(0, abs=1e-6)
  assert identical['sfid'] == pytest.approx(0, abs=1e-6)
  assert identical['precision'] == identical['recall'] == 1.0
  assert 'Inception features of reference: 100.0% 96/96 images' in caplog.text  # progress, off a terminal, at the end

  results = evaluator.evaluate(ref, samples, graph_path, batch_size=32)
  assert results['fid'] > 0 and results['sfid'] > 0
  assert 1.0 <= results['inception_score'] <= NUM_CLASSES
  assert 0 <= results['precision'] <= 1 and 0 <= results['recall'] <= 1
  assert results['num_samples'] == 80 and results['reference_statistics'] == 'computed'

  # A reference with stored ADM statistics only: the same FID/sFID, no P/R.
  with inception.InceptionV3(graph_path) as net:
    stats = fid.FIDStatistics.from_features(*net.features(ref_images))
  stats_only = str(tmp_path / 'stats_only.npz')
  stats.save(stats_only)
  from_stats = evaluator.evaluate(stats_only, samples, graph_path)
  assert from_stats['reference_statistics'] == 'precomputed'
  assert from_stats['fid'] == pytest.approx(results['fid'], rel=1e-5)
  assert from_stats['sfid'] == pytest.approx(results['sfid'], rel=1e-5)
  assert from_stats['precision'] is None and from_stats['recall'] is None


def test_evaluator_cli_writes_json_beside_samples_and_reports_errors(graph_path, tmp_path, capsys):
  ref, samples = str(tmp_path / 'ref.npz'), str(tmp_path / 'samples.npz')
  np.savez(ref, arr_0=_images(40, 13))
  np.savez(samples, arr_0=_images(30, 14))
  assert evaluator.main([ref, samples, f'--inception_graph={graph_path}']) == 0
  out = capsys.readouterr().out
  for label in ('Inception Score:', 'FID:', 'sFID:', 'Precision:', 'Recall:'):
    assert label in out
  with open(str(tmp_path / 'samples.eval.json')) as f:
    written = json.load(f)
  assert set(written) >= {'inception_score', 'fid', 'sfid', 'precision', 'recall', 'settings'}

  assert evaluator.main([ref, samples, '--inception_graph', str(tmp_path / 'no.pb')]) == 2
  assert 'classify_image_graph_def.pb' in capsys.readouterr().err
  assert evaluator.main([ref, str(tmp_path / 'missing.npz'), f'--inception_graph={graph_path}']) == 2
  assert 'missing.npz' in capsys.readouterr().err
