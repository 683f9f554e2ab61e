"""The ADM evaluator's InceptionV3: a frozen TF1 graph run through tf.compat.v1.

The ADM protocol (openai/guided-diffusion `evaluations/evaluator.py`) runs the
2015 TensorFlow InceptionV3, `classify_image_graph_def.pb`, which it
downloads from `INCEPTION_URL`. This machine cannot download it: fetch it
where there is internet and pass its path. Facts of the protocol kept here:

- Images are uint8 NHWC, cast to float32 in [0, 255], fed in batches of 64 in
  place of the graph's `ExpandDims:0` (the batch axis the graph adds after
  decoding a JPEG). The graph itself resizes to 299x299 (TF1 bilinear) and
  scales to [-1, 1]: no resizing or normalisation happens in Python.
- FID features: `pool_3:0`, [N, 1, 1, 2048] -> [N, 2048].
- sFID features: `mixed_6/conv:0`, [N, 17, 17, 768]; the first 7 channels,
  flattened in (H, W, C) order -> [N, 17*17*7 = 2023].
- Inception Score: softmax of `pool_3 @ W`, W the weight input of the op
  `softmax/logits/MatMul` ([2048, 1008]; no bias, as ADM and improved-gan),
  in batches of 512; IS over consecutive splits of 5000 samples (10 splits
  for 50K), averaged.

TensorFlow is imported inside functions only: importing it costs ~5 s, and
nothing else in the package should pay that.
"""

import dataclasses

import numpy as np
from etils import epath

from groupdiff_jax import errors

INCEPTION_URL = ('https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/'
                 'classify_image_graph_def.pb')
FEATURE_BATCH_SIZE = 64
SOFTMAX_BATCH_SIZE = 512
IS_SPLIT_SIZE = 5000


@dataclasses.dataclass(frozen=True)
class GraphSpec:
  """Where the ADM tensors are in the graph (changeable for stand-in graphs)."""
  input_tensor: str = 'ExpandDims:0'
  pool_tensor: str = 'pool_3:0'
  spatial_tensor: str = 'mixed_6/conv:0'
  logits_matmul_op: str = 'softmax/logits/MatMul'
  spatial_channels: int = 7


def missing_graph_message(path):
  where = f'InceptionV3 graph not found: {path!r}.' if path else 'No InceptionV3 graph given.'
  return (f'{where} The ADM evaluator uses the frozen TF1 graph classify_image_graph_def.pb, '
          f'downloaded from {INCEPTION_URL} . This machine cannot download it: copy it here from '
          'a machine with internet access and pass its path (--config.eval.inception_graph=PATH, or '
          '--inception_graph=PATH of the evaluator).')


def check_graph_path(path):
  """Raises MissingInputError (a FileNotFoundError), saying where the graph comes from, if path is not a file."""
  if not path or not epath.Path(path).is_file():
    raise errors.MissingInputError(missing_graph_message(path))


def load_graph_def(path):
  """Parses a frozen GraphDef (.pb); clear errors if missing or not a GraphDef."""
  check_graph_path(path)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (lazy: ~5 s)

  graph_def = tf.compat.v1.GraphDef()
  with epath.Path(path).open('rb') as f:
    try:
      graph_def.ParseFromString(f.read())
    except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass.
      raise errors.WeightsError(f'{path}: not a TensorFlow GraphDef ({e}). Expected ADM\'s '
                                f'classify_image_graph_def.pb from {INCEPTION_URL} .') from e
  return graph_def


def _check_images(batch):
  if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
    raise ValueError(f'Inception input must be uint8 [N, H, W, 3] images in [0, 255]; got '
                     f'{batch.dtype} {batch.shape}.')


def _batches(images, batch_size):
  for start in range(0, len(images), batch_size):
    yield images[start:start + batch_size]


class InceptionV3:
  """The ADM InceptionV3 graph in its own tf.Graph and Session.

  Usage:
    with InceptionV3('classify_image_graph_def.pb') as net:
      pool, spatial = net.features(images)   # [N, 2048], [N, 2023]
      probs = net.softmax(pool)              # [N, 1008]
  """

  def __init__(self, graph_path, batch_size=FEATURE_BATCH_SIZE, spec=GraphSpec()):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (lazy: ~5 s)
    v1 = tf.compat.v1

    self.graph_path = graph_path
    self.batch_size = batch_size
    self.spec = spec
    graph_def = load_graph_def(graph_path)
    self.graph = tf.Graph()
    with self.graph.as_default():
      self._images = v1.placeholder(tf.float32, shape=[None, None, None, 3], name='images')
      try:
        pool, spatial, matmul = tf.import_graph_def(
            graph_def, input_map={spec.input_tensor: self._images},
            return_elements=[spec.pool_tensor, spec.spatial_tensor, spec.logits_matmul_op],
            name='inception')
      except ValueError as e:
        raise errors.WeightsError(f'{graph_path}: the graph lacks a tensor the ADM evaluator reads ({spec}): {e}. '
                                  f'Use ADM\'s classify_image_graph_def.pb from {INCEPTION_URL} .') from e
      self._pool = pool
      self._spatial = spatial[..., :spec.spatial_channels]
      self._pool_input = v1.placeholder(tf.float32, shape=[None, None], name='pool_features')
      weights = matmul.inputs[1]  # [D, K]; ADM applies no bias.
      self._softmax = tf.nn.softmax(tf.matmul(self._pool_input, weights))
    config = v1.ConfigProto(allow_soft_placement=True)
    config.gpu_options.allow_growth = True
    self.session = v1.Session(graph=self.graph, config=config)

  def close(self):
    self.session.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def features(self, images, total=None, progress=None):
    """Pool and spatial features of uint8 images.

    Args:
      images: uint8 [N, H, W, 3] array, or an iterable of such batches (each
        at most a few hundred images; an array is split into batches of
        `batch_size`).
      total: number of images, for progress only (taken from an array).
      progress: optional callable(done, total) called after every batch.

    Returns:
      (pool [N, D], spatial [N, Ds]) float32; D = 2048, Ds = 2023 with the
      real graph.
    """
    if isinstance(images, np.ndarray):
      _check_images(images)
      total = len(images)
      images = _batches(images, self.batch_size)
    pools, spatials, done = [], [], 0
    for batch in images:
      batch = np.asarray(batch)
      _check_images(batch)
      pool, spatial = self.session.run([self._pool, self._spatial],
                                       {self._images: batch.astype(np.float32)})
      pools.append(pool.reshape(pool.shape[0], -1))  # [B, D]
      spatials.append(spatial.reshape(spatial.shape[0], -1))  # [B, h*w*7]
      done += len(batch)
      if progress is not None:
        progress(done, total)
    if not pools:
      raise ValueError('No images to compute Inception features of.')
    return np.concatenate(pools), np.concatenate(spatials)

  def softmax(self, pool, batch_size=SOFTMAX_BATCH_SIZE):
    """Class probabilities [N, K] (K = 1008) from pool features [N, D]."""
    pool = np.asarray(pool, np.float32)
    out = [self.session.run(self._softmax, {self._pool_input: pool[i:i + batch_size]})
           for i in range(0, len(pool), batch_size)]
    return np.concatenate(out)


def inception_score(probs, split_size=IS_SPLIT_SIZE):
  """Inception Score of class probabilities, as ADM.

  IS = exp(E_x KL(p(y|x) || p(y))) on each consecutive split of `split_size`
  samples (the last split may be smaller and counts the same), averaged over
  splits: 50K samples give ADM's 10 splits of 5000. Terms with p(y|x) = 0
  count 0 (ADM would give NaN; a real softmax is never exactly 0).

  Args:
    probs: [N, K] rows summing to 1.
    split_size: samples per split.

  Returns:
    A Python float; 1 for identical predictions, K for confident predictions
    spread evenly over K classes.
  """
  from scipy import special  # pylint: disable=g-import-not-at-top

  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or len(probs) == 0:
    raise ValueError(f'Expected probabilities [N, K] with N >= 1; got shape {probs.shape}.')
  scores = []
  for start in range(0, len(probs), split_size):
    part = probs[start:start + split_size]  # [S, K]
    marginal = part.mean(axis=0, keepdims=True)  # [1, K]
    kl = special.xlogy(part, part) - special.xlogy(part, marginal)  # [S, K]
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores))
