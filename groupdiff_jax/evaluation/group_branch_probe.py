"""Does group attention help the unconditional branch? Its velocity error with group attention on vs off.

For held-out images arranged in groups of N (members contiguous), at each
time t of a grid (SiT time, 0 = noise) and with the same noise and member
ids for both: the null-label (unconditional) velocity prediction with group
attention on (the group attends jointly, as GroupDiff-l's unconditional
branch samples) and off (each image alone, `group_attention=False`), each
scored by the mean squared error to the true velocity of the linear path.
Called at checkpoints through training it gives the learning curve of the
group branch (experiments/fashion_table1.py: similarity, same-class and
random groups).

  errors = velocity_errors(model, params, images, group_size, null_class, max_group_size, rng)
  # {t: {'on': mse, 'off': mse}}
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax import transport
from groupdiff_jax.models.embeddings import draw_sample_ids

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


@functools.partial(jax.jit, static_argnames=('model', 'group_size', 'max_group_size', 'null_class'))
def _errors_at(model, params, images, t, rng, *, group_size, max_group_size, null_class):
  """(mse on, mse off) over images [G*N, H, W, C] at time t."""
  noise_rng, id_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, images.shape, images.dtype)
  times = jnp.full((images.shape[0],), t, jnp.float32)
  x_t, target = transport.interpolate(images, noise, times)
  labels = jnp.full((images.shape[0],), null_class, jnp.int32)
  ids = None
  if max_group_size > 0:
    ids = draw_sample_ids(id_rng, images.shape[0] // group_size, group_size, max_group_size)
  channels = images.shape[-1]
  errors = []
  for on in (True, False):
    prediction = model.apply({'params': params}, x_t, times, labels, ids, group_size=group_size,
                             group_attention=on)[..., :channels]
    errors.append(jnp.mean(jnp.square(prediction - target)))
  return tuple(errors)


def velocity_errors(model, params, images, group_size, null_class, max_group_size, rng, times=TIMES):
  """{f'{t:g}': {'on': mse, 'off': mse}} over `images` [G*N, H, W, C] (groups of `group_size` contiguous)."""
  images = jnp.asarray(images, jnp.float32)
  result = {}
  for i, t in enumerate(times):
    on, off = _errors_at(model, params, images, jnp.float32(t), jax.random.fold_in(rng, i), group_size=group_size,
                         max_group_size=max_group_size, null_class=null_class)
    result[f'{t:g}'] = {'on': float(on), 'off': float(off)}
  return result


def probe_groups(labels, embeddings, num_groups, group_size, seed=0):
  """Row indices [num_groups * N] of held-out groups, per kind: 'similarity' (an anchor and its N-1 nearest
  neighbours by cosine of `embeddings`), 'class' (N of the anchor's class), 'random'."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  anchors = rng.choice(len(labels), num_groups, replace=False)
  similarity, same_class = [], []
  for a in anchors:
    scores = unit @ unit[a]
    scores[a] = -np.inf
    similarity.append(np.concatenate([[a], np.argsort(-scores)[:group_size - 1]]))
    members = np.flatnonzero(labels == labels[a])
    same_class.append(np.concatenate([[a], rng.choice(members[members != a], group_size - 1, replace=False)]))
  random = rng.choice(len(labels), num_groups * group_size, replace=False)
  return {'similarity': np.concatenate(similarity), 'class': np.concatenate(same_class), 'random': random}
