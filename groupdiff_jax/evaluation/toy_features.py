"""Feature network that scores toy-shapes samples: FD_toy and class accuracy.

The toy sweep (experiments/table1.py, experiments/toy_pilot.py) cannot use
Inception on 16x16 shapes, so it trains a small CNN on the real toy images
(data/toy_shapes.py) and measures in its feature space:

  params = train_feature_net(images, labels, attributes, steps)
  featurize = make_featurizer(params)           # images [M,16,16,3] in [-1,1]
  features, predicted_class = featurize(images)  # [M, D] float64, [M] int
  reference = fid.FIDStatistics.from_features(featurize(train_images)[0])
  evaluate_real(featurize, held_images, held_labels, reference)
      # {'accuracy': ..., 'fd': ...}: held-out real images (another seed)
  score_samples(featurize, samples_uint8, sample_labels, reference)
      # {'fd': ..., 'class_accuracy': ...}: generated images
  featurize, reference, seconds = load_or_train(images, labels, attributes, steps, path)
      # the above, trained once and kept in `path` (the monitor and the experiments)

The network learns the shape class, the texture and the continuous
attributes (colours, size, position, rotation), so its FEATURES-d
penultimate layer sees everything the generator must get right, not only
the class. A scorer is only useful if it tells good from bad: on real
held-out images it must classify (almost) all shapes and give an FD near
the finite-sample floor (experiments/table1.py reports both in its meta).
"""

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import serialization

from groupdiff_jax import errors
from groupdiff_jax.data import toy_shapes
from groupdiff_jax.evaluation import fid

FEATURES = 64  # width of the feature layer the Frechet distance is computed in
NUM_REGRESSION_TARGETS = 10  # fg rgb, bg rgb, size, x, y, rotation (attribute_targets)
LEARNING_RATE = 2e-3  # Adam, cosine-decayed to 0 over the training steps
# Training of the scorer in experiments/table1.py and toy_pilot.py. Measured (20k images of dataset
# seed 0, 2,048 held-out images of seed 1; wall times on a CPU core shared with other jobs, load
# 4-8 on 2 cores): 1,500 steps of 256: 96.3% held-out accuracy, FD 1.07, 103 s; 3,000 steps of
# 128: 98.0% held-out, FD 1.89, 200 s (a first run of that recipe: 97.9%, FD 1.73, and 2,048 of
# the training images themselves FD 2.76, the finite-sample floor). Samples of the pilot's models
# score FD 148-5256 (docs/toy_pilot.json).
DEFAULT_TRAIN_STEPS = 3000
DEFAULT_BATCH_SIZE = 128


class FeatureNet(nn.Module):
  """Small CNN: FEATURES-d features (pre-activation), heads for class, texture and attributes."""
  features: int = FEATURES

  @nn.compact
  def __call__(self, x):  # x: [B, 16, 16, 3] in [-1, 1]
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))  # [B, 8, 8, 32]
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))  # [B, 4, 4, 64]
    feats = nn.Dense(self.features)(x.reshape(x.shape[0], -1))  # [B, F]
    h = nn.relu(feats)
    return (feats, nn.Dense(toy_shapes.NUM_CLASSES)(h), nn.Dense(len(toy_shapes.TEXTURES))(h),
            nn.Dense(NUM_REGRESSION_TARGETS)(h))


def attribute_targets(attributes):
  """Regression targets [M, 10] of roughly unit scale: colours, size, x, y, rotation.

  Args:
    attributes: float [M, len(toy_shapes.ATTRIBUTES)] from toy_shapes.make_shapes.
  """
  a = np.asarray(attributes, np.float32)
  column = {name: i for i, name in enumerate(toy_shapes.ATTRIBUTES)}
  colours = a[:, [column[n] for n in ('fg_r', 'fg_g', 'fg_b', 'bg_r', 'bg_g', 'bg_b')]]
  size = (a[:, column['size']] - 0.5) * 4
  position = a[:, [column['x'], column['y']]] * 4
  rotation = a[:, column['rotation']] / np.deg2rad(toy_shapes.MAX_ROTATION_DEGREES)
  return np.concatenate([colours, size[:, None], position, rotation[:, None]], -1).astype(np.float32)


def _check_images(images, what):
  shape = np.shape(images)
  if len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2]:
    raise errors.UserError(f'{what} must be RGB images [M, S, S, 3] in [-1, 1]; got shape {shape}.')


_NET = FeatureNet()
_ADAM = optax.scale_by_adam()


@jax.jit
def _train_step(params, opt_state, x, y, tex, reg, learning_rate):
  """One Adam step on class + texture cross-entropy + attribute MSE; (params, opt_state, loss)."""
  def loss_fn(p):
    _, logits, tex_logits, pred = _NET.apply({'params': p}, x)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            + optax.softmax_cross_entropy_with_integer_labels(tex_logits, tex).mean()
            + jnp.mean((pred - reg) ** 2))
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = _ADAM.update(grads, opt_state)
  params = jax.tree_util.tree_map(lambda p, u: p - learning_rate * u, params, updates)
  return params, opt_state, loss


@jax.jit
def _features_and_logits(params, x):
  return _NET.apply({'params': params}, x)[:2]


def train_feature_net(images, labels, attributes, steps=DEFAULT_TRAIN_STEPS, seed=0, batch_size=DEFAULT_BATCH_SIZE):
  """FeatureNet params trained on class + texture + attribute regression.

  Args:
    images: float [M, S, S, 3] in [-1, 1] (toy_shapes.make_shapes).
    labels: int [M] shape classes.
    attributes: float [M, len(toy_shapes.ATTRIBUTES)].
    steps: Adam steps (learning rate cosine-decayed to 0 over them).
    seed: initialisation and batch order; the result is a pure function of
      the arguments.
    batch_size: images per step, drawn without replacement within a step.

  Returns:
    The params pytree of FeatureNet.
  """
  _check_images(images, 'Feature-net training images')
  if steps < 1:
    raise errors.UserError(f'The feature net needs at least 1 training step; got steps={steps}.')
  if not 1 <= batch_size <= len(images):
    raise errors.UserError(f'Feature-net batch_size={batch_size} must be in [1, {len(images)}] (the images).')
  params = _NET.init(jax.random.PRNGKey(seed), jnp.asarray(images[:1], jnp.float32))['params']
  opt_state = _ADAM.init(params)
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  targets = attribute_targets(attributes)
  texture = np.asarray(attributes)[:, toy_shapes.ATTRIBUTES.index('texture')].astype(np.int32)
  rng = np.random.default_rng(seed)
  for i in range(steps):
    index = rng.choice(len(images), batch_size, replace=False)
    learning_rate = LEARNING_RATE * 0.5 * (1 + np.cos(np.pi * i / steps))  # cosine decay to 0
    params, opt_state, loss = _train_step(params, opt_state, images[index], labels[index], texture[index],
                                          targets[index], np.float32(learning_rate))
  logging.info('Feature net: %d steps, final loss %.3f.', steps, float(loss))
  return params


def make_featurizer(params, batch_size=1024):
  """featurize(images [M, S, S, 3] in [-1, 1]) -> (features float64 [M, FEATURES], predicted class int [M])."""
  def featurize(images):
    _check_images(images, 'Images to featurize')
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
      f, logits = _features_and_logits(params, jnp.asarray(images[i:i + batch_size], jnp.float32))
      feats.append(np.asarray(f, np.float64))
      preds.append(np.asarray(jnp.argmax(logits, -1)))
    return np.concatenate(feats), np.concatenate(preds)

  return featurize


def load_or_train(images, labels, attributes, steps=DEFAULT_TRAIN_STEPS, path=None, trained_on=None, seed=0,
                  batch_size=DEFAULT_BATCH_SIZE, log=logging.info):
  """(featurize, reference FIDStatistics of `images`' features, training seconds) of the feature net.

  The one train-or-load of the toy evaluator (the training monitor,
  experiments/table1.py, experiments/toy_pilot.py). With `path` (a msgpack
  file) a net saved there with the same record of what it was trained on
  (`trained_on`, plus the steps, seed, batch size and image count) is
  loaded; any other file is trained again, not trusted, and the new net is
  written atomically with its record and training seconds. Without `path`
  the net is trained. The seconds are those of the training that made the
  net (also for a loaded one).
  """
  batch_size = min(batch_size, len(images))
  record = json.loads(json.dumps({**(trained_on or {}), 'num_images': len(images), 'steps': steps, 'seed': seed,
                                  'batch_size': batch_size}))
  saved = None
  if path is not None and epath.Path(path).exists():
    saved = serialization.msgpack_restore(epath.Path(path).read_bytes())
    if not isinstance(saved, dict) or saved.get('trained_on') != record:
      log('%s was trained on other data or steps (%s, now %s); training it again.', path,
          saved.get('trained_on') if isinstance(saved, dict) else None, record)
      saved = None
  if saved is None:
    log('Training the toy evaluator\'s feature net (%d steps) ...', steps)
    start = time.perf_counter()
    params = train_feature_net(images, labels, attributes, steps, seed=seed, batch_size=batch_size)
    saved = {'params': jax.device_get(params), 'trained_on': record, 'train_seconds': time.perf_counter() - start}
    if path is not None:
      path = epath.Path(path)
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.parent / (path.name + '.tmp')
      tmp.write_bytes(serialization.msgpack_serialize(saved))
      tmp.replace(path)
  featurize = make_featurizer(saved['params'])
  reference = fid.FIDStatistics.from_features(featurize(images)[0])
  return featurize, reference, float(saved.get('train_seconds', 0.0))


def uint8_to_unit_range(images):
  """uint8 images [M, S, S, 3] -> float32 in [-1, 1] (as samples are scored)."""
  return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def evaluate_real(featurize, held_images, held_labels, reference):
  """How the scorer does on real images it was not trained on.

  Args:
    featurize: from make_featurizer.
    held_images: float [M, S, S, 3] in [-1, 1], real images of another
      dataset seed; quantised to uint8 first, as samples are (the rounding
      of sample.quantize).
    held_labels: int [M] their classes.
    reference: fid.FIDStatistics of the training images' features.

  Returns:
    {'accuracy': class accuracy, 'fd': FD_toy to the reference} (floats).
  """
  quantised = uint8_to_unit_range(np.clip((np.asarray(held_images) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8))
  feats, pred = featurize(quantised)
  return {'accuracy': float((pred == np.asarray(held_labels)).mean()),
          'fd': reference.fid(fid.FIDStatistics.from_features(feats))}


def score_samples(featurize, samples, labels, reference):
  """{'fd': FD_toy to the reference, 'class_accuracy': vs the conditioning labels} of uint8 samples [M, S, S, 3]."""
  feats, pred = featurize(uint8_to_unit_range(samples))
  return {'fd': reference.fid(fid.FIDStatistics.from_features(feats)),
          'class_accuracy': float((pred == np.asarray(labels)).mean())}
