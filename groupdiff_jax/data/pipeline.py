"""The group pipeline: batches of the trainer's step kinds from a latent store.

`GroupPipeline.batch(step, kind)` has the interface of
`DigitsBatches.batch`: one dict per `step_plan.SubBatch` of `kind`, each
{'images': float32 [n, 32, 32, 4], 'labels': int32 [n]}, the members of a
group contiguous (`[G*N, ...]`, group g = rows g*N .. g*N+N-1).

Streams. Every SubBatch position of every step kind is a stream of images:
singles read rows from a per-epoch permutation of the store, in order;
groups read groups from the configured grouping (docs/method.md, Grouping):

  official_plan  once per epoch, anchors in shuffled order take their first
                 N-1 unused neighbours in rank order (grouping.official_epoch_plan);
                 groups are disjoint within the epoch; served in plan order
  tau_random     the paper: anchors from a per-epoch permutation; N-1 members
                 drawn at random among the anchor's neighbours with score
                 >= tau; a shortfall is filled with the nearest below tau
                 and counted (`stats['fallback_members']`)
  class          disjoint groups within one class, per epoch
  random         disjoint random groups, per epoch

How many images a stream has served before step s follows from the step
kind plan (step_plan.step_kind_name, exact per block of steps), so every
batch is a pure function of (seed, step): a run resumed at step k sees
exactly the batches an uninterrupted run would, and every host computes the
same global batch and keeps only its slice (`process_index` of
`process_count`: whole groups, contiguous). With `random_flip` and a store
holding flipped copies ([M, 2, ...]) each image's copy is drawn per step.

Each step is assembled by vectorised index arithmetic and one gather from
the memory-mapped store (no per-sample Python). With `prefetch` > 0 the
steps come from a tf.data stream (`GroupPipeline.dataset`): assembled in
parallel, in order, `prefetch` steps ahead; with a sharding, the next step
is copied to the devices while the current one trains.
"""

import collections
import functools
import threading

import numpy as np
from absl import logging

from groupdiff_jax import errors, step_plan
from groupdiff_jax.data import grouping, latent_store

GROUPINGS = ('official_plan', 'tau_random', 'class', 'random')
# Seeds of the independent random streams (mixed into numpy SeedSequences).
_SINGLES, _GROUPS, _ANCHORS, _MEMBERS, _FLIPS, _RESHUFFLE = 11, 12, 13, 14, 15, 16


def tau_random_groups(anchors, neighbors, scores, group_size, tau, rng):
  """Groups of the paper's grouping: anchor + N-1 random members with score >= tau.

  Args:
    anchors: int [G] anchor rows.
    neighbors, scores: [M, K] neighbour lists (best first).
    group_size: N.
    tau: cosine threshold.
    rng: numpy Generator.

  Returns:
    (int32 [G, N] groups, anchor first; int [G] members below tau per group).
    Members above tau come first in random order, then the shortfall filled
    from the nearest neighbours below tau (our reading of the paper).
  """
  cand = np.asarray(neighbors[anchors])  # [G, K]
  passes = np.asarray(scores[anchors]).astype(np.float32) >= tau  # [G, K]
  num_k = cand.shape[1]
  # Sort key: random in [0, 1) for candidates above tau, 1 + rank below it.
  key = np.where(passes, rng.random(cand.shape), 1.0 + np.arange(num_k) / num_k)
  pick = np.argsort(key, axis=1, kind='stable')[:, :group_size - 1]  # [G, N-1]
  members = np.take_along_axis(cand, pick, 1)
  fallbacks = np.maximum(0, group_size - 1 - passes.sum(1))
  return np.concatenate([np.asarray(anchors)[:, None], members], 1).astype(np.int32), fallbacks


def float16_to_float32(x, order=None):
  """float16 [n, ...] -> float32 [n, ...], bit-identical to NumPy's cast and several times faster.

  Row i of x goes to row order[i] of the result (None: in place). NumPy's
  float16 cast has no vector loop (~5 ns a value, most of a step's assembly
  time). Here each half, sign-extended to int32, has its sign, 5 exponent
  and 10 mantissa bits moved into a float32's places and 112 added to the
  exponent (the bias goes from 15 to 127); zeros and subnormal halves
  (exponent 0) are then set to sign * mantissa * 2**-24, which is exact and
  a normal float32. Integer arithmetic only, so threads that flush float32
  subnormals (tf.data's do) give the same bits. Inputs holding Inf/NaN use
  NumPy's cast.
  """
  x = np.ascontiguousarray(x)
  order = slice(None) if order is None else order
  bits = np.empty(x.shape, np.int32)
  bits[order] = x.view(np.int16)  # sign-extended
  exponent = bits & np.int32(0x7C00)
  out = bits.view(np.float32)
  if exponent.size and exponent.max() == 0x7C00:  # Inf or NaN
    out[order] = x
    return out
  tiny = np.flatnonzero(exponent == 0)  # zeros and subnormals
  tiny_halves = bits.reshape(-1)[tiny]
  bits <<= 13
  bits &= np.int32(-0x70002000)  # 0x8FFFE000: the sign, 5 exponent bits and 10 mantissa bits
  bits += np.int32(112 << 23)
  magnitude = (tiny_halves & 0x3FF).astype(np.float32) * np.float32(2.0**-24)
  out.reshape(-1)[tiny] = np.where(tiny_halves < 0, -magnitude, magnitude)  # keeps -0.0
  return out


def tau_coverage(scores, tau, group_size, chunk=1 << 16):
  """Fraction of anchors with at least N-1 neighbours scoring >= tau."""
  count = 0
  for start in range(0, len(scores), chunk):
    count += int(((np.asarray(scores[start:start + chunk]) >= tau).sum(1) >= group_size - 1).sum())
  return count / max(1, len(scores))


class GroupPipeline:
  """Batches of the step kinds of a run, served from a latent store.

  Args:
    store: latent_store.LatentStore (or anything with `latents`, `labels`,
      `has_flips`).
    kinds: step_plan.step_kinds(...) of the run (name -> tuple of SubBatch,
      global sizes).
    seed: the run's seed (the same as the step-kind plan's).
    group_ratio: as in step_plan (to follow the trainer's step-kind plan).
    grouping: one of GROUPINGS.
    neighbors, scores: [M, K] lists for 'official_plan' / 'tau_random'.
    tau: threshold of 'tau_random'.
    random_flip: draw the flipped copy at random (needs a store [M, 2, ...]).
    process_index, process_count: this host's slice of every global batch.
    prefetch: steps assembled ahead by tf.data (0: each step assembled when
      asked for, without TensorFlow).
    sharding: optional jax Sharding of the global batch; batches are then
      placed on devices (multi-host: jax.make_array_from_process_local_data).
    block_length: the step-kind plan's block (step_plan default).
  """

  def __init__(self, store, kinds, *, seed, group_ratio, grouping='official_plan', neighbors=None, scores=None,
               tau=0.7, random_flip=False, process_index=0, process_count=1, prefetch=2, sharding=None,
               block_length=100):
    if grouping not in GROUPINGS:
      raise errors.ConfigError(f'Unknown data.grouping={grouping!r}; use one of {GROUPINGS}.')
    if grouping in ('official_plan', 'tau_random') and neighbors is None:
      raise errors.ConfigError(f"data.grouping={grouping!r} needs neighbour lists (config.data.neighbors_dir); "
                       f"'class' and 'random' do not.")
    if random_flip and not store.has_flips:
      raise errors.ConfigError('data.random_flip=True but the latent store has no flipped copies (latents [M, 32, 32, 4]); '
                       're-run the extraction job with --flip, or set data.random_flip=False.')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count}).')
    self.store, self.kinds, self.seed, self.group_ratio = store, kinds, int(seed), group_ratio
    self.grouping, self.neighbors, self.scores, self.tau = grouping, neighbors, scores, tau
    self.random_flip = random_flip
    self.process_index, self.process_count = process_index, process_count
    self.block_length, self.sharding = block_length, sharding
    self.num_rows = len(store.labels)
    self.labels = np.asarray(store.labels)
    batch_size = sum(sub.num_images for sub in next(iter(kinds.values())))
    if any(sum(sub.num_images for sub in kind) != batch_size for kind in kinds.values()):
      raise ValueError(f'Every step kind must hold the same number of images; got {kinds}.')  # a bug, not input
    if batch_size > self.num_rows:
      raise errors.ConfigError(f'Batches of {batch_size} images need at least as many rows; the store has {self.num_rows}.')
    self.steps_per_epoch = max(1, self.num_rows // batch_size)
    for name, kind in kinds.items():
      for sub in kind:
        if sub.num_groups % process_count:
          raise errors.ConfigError(f'{sub.num_groups} groups of {sub.group_size} per {name} step cannot be split evenly '
                           f'over {process_count} hosts; make the batch a multiple of {process_count * sub.group_size}.')
    self.batch_size = batch_size
    self.stats = {'group_members': 0, 'fallback_members': 0}
    self._plan_lock = threading.Lock()  # tf.data assembles steps in parallel: build each epoch plan once
    self._scratch = threading.local()
    self._prefetch = prefetch
    self._steps, self._next_step, self._ready = None, None, collections.deque()

  # ---------------------------------------------------------------- the plan

  @functools.lru_cache(maxsize=8)
  def _block_counts(self, block):
    """int [block_length + 1]: group steps among the first i steps of `block`."""
    start = block * self.block_length
    is_group = [step_plan.step_kind_name(self.seed, start + i, self.kinds, self.group_ratio, self.block_length)
                == step_plan.GROUPS for i in range(self.block_length)]
    return np.concatenate([[0], np.cumsum(is_group)])

  def steps_of_kind_before(self, name, step):
    """How many steps of kind `name` precede `step` (a pure function of the plan)."""
    if len(self.kinds) == 1:
      return step
    block, position = divmod(step, self.block_length)
    groups = block * step_plan.group_steps_per_block(self.group_ratio, self.block_length)
    groups += int(self._block_counts(block)[position])
    return groups if name == step_plan.GROUPS else step - groups

  def kind_name(self, step):
    return step_plan.step_kind_name(self.seed, step, self.kinds, self.group_ratio, self.block_length)

  @functools.lru_cache(maxsize=4)
  def _permutation(self, tag, part, epoch):
    return np.random.default_rng([self.seed, tag, part, epoch]).permutation(self.num_rows)

  def _stream_rows(self, tag, part, start, count):
    """Rows at positions [start, start+count) of an endless stream of per-epoch permutations."""
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(positions, self.num_rows)
    rows = np.empty(count, np.int64)
    for epoch in np.unique(epochs):
      mask = epochs == epoch
      rows[mask] = self._permutation(tag, part, int(epoch))[offsets[mask]]
    return rows

  def epoch_groups(self, epoch, group_size):
    """The epoch's disjoint groups int32 [num_groups, N] (official_plan, class, random)."""
    with self._plan_lock:
      return self._epoch_groups(epoch, group_size)

  @functools.lru_cache(maxsize=2)
  def _epoch_groups(self, epoch, group_size):
    rng = np.random.default_rng([self.seed, _GROUPS, epoch, group_size])
    if self.grouping == 'official_plan':
      groups = grouping.official_epoch_plan(self.neighbors, group_size, rng)
    elif self.grouping == 'class':
      groups = grouping.class_groups(self.labels, group_size, rng)
    else:
      groups = grouping.random_groups(self.num_rows, group_size, rng)
    if not len(groups):
      raise errors.ConfigError(f'The {self.grouping} grouping made no group of {group_size} in epoch {epoch}; '
                       f'check the neighbour lists / labels.')
    return groups

  def _planned_groups(self, name, part, sub, step):
    """Global groups [G, N] of a planned grouping for this step."""
    epoch = step // self.steps_per_epoch
    before = self.steps_of_kind_before(name, step) - self.steps_of_kind_before(name, epoch * self.steps_per_epoch)
    groups = self.epoch_groups(epoch, sub.group_size)
    positions = before * sub.num_groups + np.arange(sub.num_groups)
    laps, positions = np.divmod(positions, len(groups))
    out = np.empty((sub.num_groups, sub.group_size), np.int32)
    for lap in np.unique(laps):  # more group steps than the plan has groups: reshuffle it
      mask = laps == lap
      order = (np.arange(len(groups)) if lap == 0 else
               np.random.default_rng([self.seed, _RESHUFFLE, epoch, part, int(lap)]).permutation(len(groups)))
      out[mask] = groups[order[positions[mask]]]
    return out

  def indices(self, step, kind, name=None):
    """Per SubBatch: (rows int [n_local], flip int [n_local] or None, fallbacks) for this host."""
    name = name or self.kind_name(step)
    out = []
    for part, sub in enumerate(kind):
      consumed = self.steps_of_kind_before(name, step) * sub.num_images
      fallbacks = 0
      if sub.group_size == 1:
        rows = self._stream_rows(_SINGLES, part, consumed, sub.num_images)
      elif self.grouping == 'tau_random':
        anchors = self._stream_rows(_ANCHORS, part, consumed // sub.group_size, sub.num_groups)
        rng = np.random.default_rng([self.seed, _MEMBERS, step, part])
        groups, short = tau_random_groups(anchors, self.neighbors, self.scores, sub.group_size, self.tau, rng)
        rows = groups.reshape(-1)
      else:
        rows = self._planned_groups(name, part, sub, step).reshape(-1)
      flips = None
      if self.random_flip:
        flips = np.random.default_rng([self.seed, _FLIPS, step, part]).integers(0, 2, sub.num_images)
      per_host = sub.num_images // self.process_count
      local = slice(self.process_index * per_host, (self.process_index + 1) * per_host)
      if sub.group_size > 1 and self.grouping == 'tau_random':
        fallbacks = int(short.reshape(self.process_count, -1)[self.process_index].sum())
      out.append((rows[local], None if flips is None else flips[local], fallbacks))
    return out

  # ---------------------------------------------------------------- assembly

  def _gather(self, rows, flips):
    """float32 [n, 32, 32, 4]: the latents of `rows` (their flipped copies where flips is 1), in batch order."""
    latents = np.asarray(self.store.latents)  # a plain view of the memory map
    if latents.ndim == 5:  # [M, 2, ...] -> [2M, ...]: row r's copy f is 2r + f
      latents = latents.reshape((-1,) + latents.shape[2:])
      rows = 2 * rows + (0 if flips is None else flips)
    order = np.argsort(rows, kind='stable')  # sequential reads from the memory map
    buffers = self._scratch.__dict__  # per thread: fresh large arrays cost page faults
    key = (len(rows), latents.dtype.str)
    if key not in buffers:
      buffers[key] = np.empty((len(rows),) + latents.shape[1:], latents.dtype)
    picked = np.take(latents, rows[order], axis=0, out=buffers[key], mode='clip')  # rows are in range; 'raise' copies
    if picked.dtype == np.float16:
      return float16_to_float32(picked, order)
    images = np.empty(picked.shape, np.float32)
    images[order] = picked
    return images

  def _assemble(self, step):
    """This host's slice of `step`, its SubBatches one after the other.

    Returns images float32 [n, 32, 32, 4], labels int32 [n], the number of
    group members and of tau_random fallback members among them.
    """
    name = self.kind_name(step)
    indices = self.indices(step, self.kinds[name], name)
    rows = np.concatenate([rows for rows, _, _ in indices])
    flips = np.concatenate([flips for _, flips, _ in indices]) if self.random_flip else None
    members = sum(len(r) for (r, _, _), sub in zip(indices, self.kinds[name]) if sub.group_size > 1)
    return self._gather(rows, flips), self.labels[rows].astype(np.int32), members, sum(f for _, _, f in indices)

  def _split(self, kind, images, labels):
    """The SubBatch dicts of a step of `kind` from its flat arrays (views), placed on devices if configured."""
    parts, start = [], 0
    for sub in kind:
      size = sub.num_images // self.process_count
      parts.append({'images': images[start:start + size], 'labels': labels[start:start + size]})
      start += size
    parts = tuple(parts)
    if self.sharding is None:
      return parts
    import jax
    if self.process_count == 1:
      return jax.device_put(parts, self.sharding)
    return tuple({k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in p.items()} for p in parts)

  def dataset(self, start_step=0):
    """A tf.data.Dataset of this host's steps start_step, start_step + 1, ...

    Elements: (step int64, images float32 [n, 32, 32, 4], labels int32 [n],
    group members int64, fallback members int64), the step's SubBatches one
    after the other. Steps are assembled in parallel (AUTOTUNE) and in order
    (deterministic), `prefetch` ahead; each is a pure function of its step.
    """
    import tensorflow as tf  # only here: a pipeline with prefetch=0 runs without TensorFlow
    latent_shape = tuple(self.store.latents.shape[-3:])
    local_size = self.batch_size // self.process_count

    def assemble(step):
      images, labels, members, fallbacks = self._assemble(int(step))
      return step, images, labels, np.int64(members), np.int64(fallbacks)

    def assemble_op(step):
      out = tf.numpy_function(assemble, [step], (tf.int64, tf.float32, tf.int32, tf.int64, tf.int64), stateful=False)
      out[1].set_shape((local_size,) + latent_shape)
      out[2].set_shape((local_size,))
      for scalar in (out[0], out[3], out[4]):
        scalar.set_shape(())
      return out

    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    dataset = tf.data.Dataset.range(int(start_step), np.iinfo(np.int64).max).with_options(options)
    return dataset.map(assemble_op, num_parallel_calls=tf.data.AUTOTUNE).prefetch(max(1, self._prefetch))

  def batch(self, step, kind):
    """One dict per SubBatch of `kind` (this host's slice): images float32 [n, 32, 32, 4], labels int32 [n]."""
    step = int(step)
    name = self.kind_name(step)
    if tuple(kind) != tuple(self.kinds[name]):
      raise ValueError(f'Step {step} is a {name!r} step in the plan of this pipeline ({self.kinds[name]}), '
                       f'but the trainer asked for {kind}: the pipeline was built with other train settings.')
    if not self._prefetch:
      images, labels, members, fallbacks = self._assemble(step)
      parts = self._split(kind, images, labels)
    else:
      if step != self._next_step:  # the first step, or a jump (resume): restart the stream there
        self._steps = self.dataset(step).as_numpy_iterator()
        self._ready.clear()
      # With a sharding, the next step is already on its way to the devices while this one trains.
      while len(self._ready) < (2 if self.sharding is not None else 1):
        ready_step, images, labels, ready_members, ready_fallbacks = next(self._steps)
        ready_kind = self.kinds[self.kind_name(int(ready_step))]
        self._ready.append((int(ready_step), self._split(ready_kind, images, labels), int(ready_members),
                            int(ready_fallbacks)))
      ready_step, parts, members, fallbacks = self._ready.popleft()
      assert ready_step == step, (ready_step, step)
      self._next_step = step + 1
    self.stats['group_members'] += members
    self.stats['fallback_members'] += fallbacks
    return parts

  def close(self):
    """Stops the tf.data stream (it is restarted by the next `batch`)."""
    self._steps, self._next_step = None, None
    self._ready.clear()


def from_config(config, process_index=0, process_count=1, sharding=None):
  """The pipeline of a run: config.data.{latent_dir, neighbors_dir, grouping, tau, random_flip, prefetch}."""
  data, train = config.data, config.train
  kinds = step_plan.step_kinds(train.batch_size, train.group_size, train.group_ratio, train.mode, train.mixed_steps)
  if not data.latent_dir:
    raise errors.ConfigError('config.data.latent_dir is not set: point it at a latent store (configs/imagenet_latents.py; '
                     'written by python -m groupdiff_jax.data.extract_latents_job).')
  store = latent_store.LatentStore(data.latent_dir, num_classes=config.model.num_classes)
  grouping_name = data.grouping
  neighbors = scores = None
  if grouping_name in ('official_plan', 'tau_random'):
    if not data.neighbors_dir:
      raise errors.ConfigError(f"config.data.grouping={grouping_name!r} needs config.data.neighbors_dir (written by python -m "
                       f"groupdiff_jax.data.neighbors_job); 'class' and 'random' need none.")
    neighbors, scores, meta = latent_store.read_neighbors(data.neighbors_dir, len(store), train.group_size - 1)
    if grouping_name == 'official_plan':
      neighbors = np.asarray(neighbors)  # the epoch plan reads every row: load once
    tau = data.tau
    logging.info('Neighbour lists %s: K=%d, recall %s; %.1f%% of anchors have >= %d neighbours with score >= %.2f.',
                 data.neighbors_dir, neighbors.shape[1], meta.get('recall'),
                 100 * tau_coverage(scores, tau, train.group_size), train.group_size - 1, tau)
  random_flip = data.random_flip
  if random_flip and not store.has_flips:
    logging.warning('data.random_flip is set but %s has no flipped copies; training without flips.', data.latent_dir)
    random_flip = False
  logging.info('Latent store %s: %d rows%s; grouping %s.', data.latent_dir, len(store),
               ' with flips' if store.has_flips else '', grouping_name)
  return GroupPipeline(store, kinds, seed=config.seed, group_ratio=train.group_ratio, grouping=grouping_name,
                       neighbors=neighbors, scores=scores, tau=data.tau,
                       random_flip=random_flip, process_index=process_index,
                       process_count=process_count, prefetch=data.prefetch, sharding=sharding)
