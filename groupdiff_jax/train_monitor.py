"""What a long run shows while it trains: sample grids, FID (or the toy evaluator's scores), a profiler trace.

The training loop (train.py) calls `TrainMonitor.before_step(step)` and
`after_step(steps_done, state)` on every process; this module decides what
runs at which step:

- every `train.sample_every` steps: a grid of `sample.grid_groups` jointly
  generated groups from the EMA weights with the config's sampler, the same
  noise and classes (group g is class g mod num_classes) at every step, so
  grids compare. It is the sample job's sampler (sample.chunk_sampler,
  compiled once) on this process's devices, split by whole groups; latent
  models are decoded with the VAE of `sample.vae_path` (no grid without
  it). Written to TensorBoard (`samples`, uint8 [1, H, W, C]) and to
  <workdir>/progress/step_<k>.png. Its cost is stated at start
  (describe.grid_cost, analytic FLOPs).
- every `train.eval_every` steps: the sample job's `write_samples` (given
  by the caller: main.py passes sample_job.sample_and_save, chunks over
  hosts and devices; without it there is no FID, with one note) makes
  `eval.num_samples` images into <workdir>/eval/step_<k>/, process 0
  computes their FID with the ADM evaluator's InceptionV3 against
  `eval.reference_batch` (its stored mu/sigma, or statistics of its images,
  computed once) and writes `fid_10k` (named by the count) and
  eval/step_<k>/fid.json; the sample files are then removed. Without
  `eval.reference_batch` and `eval.inception_graph` it is skipped with one
  note. On the toy shapes (data.name='toy_shapes') the toy evaluator
  (evaluation/toy_features.py) scores them instead: `fd_toy_<n>` and
  `class_accuracy_<n>`, with a feature net trained once on the run's data
  (`eval.toy_feature_steps`) and kept in <workdir>/toy_feature_net.msgpack
  (toy_features.load_or_train).
- `train.profile_steps=(start, stop)`: a jax.profiler trace of steps
  [start, stop) into <workdir>/profile/ (TensorBoard's profile plugin,
  Perfetto) on process `train.profile_process`.

The config lines, config.json, the metric writer and device memory are in
run_log.py; the FLOP costs in describe.py.
"""

import os
import time

import jax
import numpy as np
from absl import logging

from groupdiff_jax import describe, errors, run_log, sample, sample_chunks, sharding, storage

PROGRESS_DIR = 'progress'
EVAL_DIR = 'eval'
PROFILE_DIR = 'profile'
TOY_FEATURE_NET = 'toy_feature_net.msgpack'
GRID_STREAM = 2  # the grids' fixed noise: PRNGKey(seed + GRID_STREAM) (the sample job uses seed + 1)


# --- Checks ------------------------------------------------------------------------
def profile_range(config):
  """(start, stop) of train.profile_steps, or None; a ConfigError for anything but 0 <= start < stop."""
  steps = tuple(config.train.profile_steps or ())
  if not steps:
    return None
  if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 0 <= steps[0] < steps[1]:
    raise errors.ConfigError(f'train.profile_steps={steps}: give two steps (start, stop) with 0 <= start < stop, '
                             "e.g. --config.train.profile_steps='(10,12)', or () for no trace.")
  return steps


def check_config(config):
  profile_range(config)
  for field in ('sample_every', 'eval_every'):
    if config.train[field] < 0:
      raise errors.ConfigError(f'train.{field}={config.train[field]} must be >= 0 (0 = off).')
  if config.train.eval_every and config.eval.num_samples < 2:
    raise errors.ConfigError(f'eval.num_samples={config.eval.num_samples}: FID needs at least 2 samples.')


def fid_name(num_samples):
  """'fid_10k' for 10,000 samples; 'fid_<n>' when n is not a multiple of 1,000."""
  return f'fid_{num_samples // 1000}k' if num_samples % 1000 == 0 else f'fid_{num_samples}'


def _with_sample(config, **fields):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.sample.update(fields)
  return config


# --- The monitor ------------------------------------------------------------------
class TrainMonitor:
  """The periodic actions of a training run; see the module docstring.

  write_samples: callable(config, out_dir, params, step) -> the
  path of the samples npz on process 0 (None elsewhere), e.g.
  sample_job.sample_and_save; None: no FID during training.
  """

  def __init__(self, config, workdir, writer, model, log=logging.info, write_samples=None):
    check_config(config)
    self.config, self.workdir, self.writer, self.model, self.log = config, workdir, writer, model, log
    self.write_samples = write_samples
    self.is_main = jax.process_index() == 0
    self.sample_every = config.train.sample_every
    self.eval_every = config.train.eval_every
    self.profile = profile_range(config)
    self.profiling = False
    self._grid = None
    self._reference = None
    if self.sample_every and sample.is_latent(config.model) and not config.sample.vae_path:
      log('Sample grids every %d steps need sample.vae_path (an SD-VAE to decode the latents): no grids.',
          self.sample_every)
      self.sample_every = 0
    if self.sample_every:
      cost = describe.grid_cost(config)
      if cost['ratio'] is not None:
        log('Sample grid every %d steps: %.3g FLOPs (%d groups), %.2f%% of the training FLOPs between two grids.',
            self.sample_every, cost['grid_flops'], config.sample.grid_groups, 100 * cost['ratio'])
    self.use_toy_eval = is_toy(config)
    self._toy = None
    if self.eval_every and not self.use_toy_eval and not (config.eval.reference_batch and
                                                        config.eval.inception_graph):
      log('No FID during training: set eval.reference_batch and eval.inception_graph (train.eval_every=%d).',
          self.eval_every)
      self.eval_every = 0
    if self.eval_every and sample.is_latent(config.model) and not config.sample.vae_path:
      log('No FID during training: this latent model needs sample.vae_path (an SD-VAE) to decode its samples.')
      self.eval_every = 0
    if self.eval_every and write_samples is None:
      log('No scores during training (train.eval_every=%d): the caller gave no sample writer '
          '(main.py passes the sample job\'s).', self.eval_every)
      self.eval_every = 0

  def write_config(self, summary_writer, start_step):
    """Process 0: the config as `key = value` lines (once), config.json, and TensorBoard hparams of a new run."""
    if not self.is_main:
      return
    self.log('Config:\n%s', run_log.config_lines(self.config))
    self.log('Config saved to %s.', run_log.save_config(self.config, self.workdir))
    if summary_writer is not None and start_step == 0:
      summary_writer.write_hparams({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                    for k, v in run_log.flat_config(self.config).items()})

  def before_step(self, step):
    """Starts the profiler trace before step `profile_steps[0]`."""
    if self.profile and step == self.profile[0] and jax.process_index() == self.config.train.profile_process:
      jax.profiler.start_trace(os.path.join(self.workdir, PROFILE_DIR))
      self.profiling = True

  def after_step(self, done, state):
    """After `done` steps: stop the trace, write a grid, compute FID, as due. Returns the seconds it took."""
    start = time.time()
    if self.profiling and done >= self.profile[1]:
      self.stop_profile(state)
    params = state.ema_params if self.config.sample.use_ema else state.params
    if self.sample_every and done % self.sample_every == 0:
      self.write_grid(done, params)
    if self.eval_every and done % self.eval_every == 0:
      self.write_fid(done, params)
    return time.time() - start

  def stop_profile(self, state=None):
    if not self.profiling:
      return
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.profiling = False
    self.log('Profiler trace of steps %s in %s (tensorboard --logdir %s, Profile tab).', self.profile,
             os.path.join(self.workdir, PROFILE_DIR), self.workdir)

  def close(self):
    self.stop_profile()

  # --- Sample grids -----------------------------------------------------------------
  def grid_images(self, params):
    """uint8 [grid_groups * N, H, W, C]: the fixed-noise groups, generated on this process's devices."""
    if self._grid is None:
      config = _with_sample(self.config, num_groups=self.config.sample.grid_groups,
                            groups_per_batch=self.config.sample.grid_groups, s_cross=False)
      plan = sample_chunks.plan_from_config(config)
      mesh = sample.local_mesh(plan.groups_per_chunk)
      decode = None
      if sample.is_latent(config.model):
        from groupdiff_jax.encoders import vae as vae_lib
        from groupdiff_jax.encoders import vae_weights
        vae_params = vae_weights.load_vae_params(config.sample.vae_path, vae_lib.SD_VAE_CONFIG)
        decode = sample.make_decoder(vae_params, vae_lib.SD_VAE_CONFIG, mesh, config.sample.decode_batch_size)
      self._grid = (plan, mesh, sample.chunk_sampler(self.model, config, mesh), decode)
    plan, mesh, run, decode = self._grid
    local = jax.device_put(sample.host_local(params), sharding.replicated(mesh))
    x, _ = run(local, plan.labels(0), jax.random.PRNGKey(self.config.seed + GRID_STREAM))
    x = np.asarray(x)[:plan.num_images]
    return decode(x) if decode is not None else sample.to_uint8(x)

  def write_grid(self, step, params):
    images = self.grid_images(params)
    if not self.is_main:
      return
    per_row = self.config.sample.images_per_group
    scale = sample.grid_scale(images.shape[1])
    grid = sample.grid_array(images, per_row, scale)  # [H', W', C]
    path = sample.save_grid(images, per_row, storage.path(self.workdir) / PROGRESS_DIR / f'step_{step}.png', scale)
    self.writer.write_images(step, {'samples': grid[None]})
    self.log('Step %d: sample grid %s.', step, path)

  # --- FID ------------------------------------------------------------------------------
  def _eval_samples(self, step, params):
    """(samples npz path or None on other processes, out_dir): eval.num_samples images by the sample job."""
    num = self.config.eval.num_samples
    per_group = self.config.sample.images_per_group
    config = _with_sample(self.config, num_groups=-(-num // per_group), s_cross=False)
    out_dir = storage.path(self.workdir) / EVAL_DIR / f'step_{step}'
    return self.write_samples(config, os.fspath(out_dir), params, step), out_dir

  def _remove_samples(self, path, out_dir):
    samples_dir = out_dir / sample_chunks.SAMPLES_DIR
    for stale in [storage.path(path)] + list(samples_dir.glob('chunk_*')):
      stale.unlink()  # the images: gigabytes at ImageNet scale; the scores and samples.png stay

  def write_fid(self, step, params):
    if self.use_toy_eval:
      return self.write_toy_fd(step, params)
    from groupdiff_jax.evaluation import evaluator, fid as fid_lib, inception
    num = self.config.eval.num_samples
    path, out_dir = self._eval_samples(step, params)
    if path is None:  # not process 0
      return
    graph, reference = self.config.eval.inception_graph, self.config.eval.reference_batch
    with inception.InceptionV3(graph) as net:
      if self._reference is None:
        self._reference = fid_lib.maybe_load(reference)
        if self._reference is None:
          ref = evaluator.open_images(reference)
          self._reference = fid_lib.FIDStatistics.from_features(
              net.features(ref.batches(net.batch_size), total=len(ref))[0])
      samples = evaluator.open_images(path)
      pool = net.features(samples.batches(net.batch_size), total=len(samples))[0][:num]  # [num, D]
    value = float(fid_lib.FIDStatistics.from_features(pool).fid(self._reference))
    name = fid_name(num)
    sample_chunks.write_json(out_dir / 'fid.json', {name: value, 'step': step, 'num_samples': num,
                                                               'reference_batch': os.fspath(storage.path(reference))})
    self._remove_samples(path, out_dir)
    self.writer.write_scalars(step, {name: value})
    self.log('Step %d: %s = %.4g (%s).', step, name, value, out_dir)

  def write_toy_fd(self, step, params):
    """The toy evaluator's FD and class accuracy of eval.num_samples samples (scalars fd_toy_<n>, ...)."""
    from groupdiff_jax.evaluation import toy_features
    num = self.config.eval.num_samples
    path, out_dir = self._eval_samples(step, params)
    if path is None:  # not process 0
      return
    if self._toy is None:
      self._toy = toy_scorer(self.config, self.workdir, self.log)
    featurize, reference = self._toy
    arrays = storage.load_npz(path)
    samples, labels = arrays['arr_0'][:num], arrays['labels'][:num]
    scores = toy_features.score_samples(featurize, samples, labels, reference)
    suffix = fid_name(num)[len('fid_'):]
    values = {f'fd_toy_{suffix}': float(scores['fd']), f'class_accuracy_{suffix}': scores['class_accuracy']}
    sample_chunks.write_json(out_dir / 'fd_toy.json', {**values, 'step': step, 'num_samples': num})
    self._remove_samples(path, out_dir)
    self.writer.write_scalars(step, values)
    self.log('Step %d: %s.', step, ', '.join(f'{k} = {v:.4g}' for k, v in values.items()))


def is_toy(config):
  """Whether quality during training is scored by the toy evaluator (the toy shapes) rather than FID."""
  return config.data.name == 'toy_shapes'


def toy_scorer(config, workdir, log=logging.info):
  """(featurize, reference FIDStatistics) of the toy evaluator for this run's data.

  The feature net is trained once on the run's toy images
  (eval.toy_feature_steps, seed 0 whatever the run's seed: runs of one data
  set are scored by one network, as experiments/table1.py) and kept in
  <workdir>/toy_feature_net.msgpack with what it was trained on; a resumed
  run loads it (trains it again if the data or steps changed), so a run's FD
  curve is measured by one scorer.
  """
  from groupdiff_jax.data import toy_shapes
  from groupdiff_jax.evaluation import toy_features
  data = config.data
  images, labels, attributes, _ = toy_shapes.load_toy_shapes(
      data.num_images, data.dataset_seed, data.image_size, data.embedding_dims, data.num_neighbors,
      **toy_shapes.data_options(data))
  trained_on = {'dataset_seed': data.dataset_seed, 'image_size': data.image_size,
                **toy_shapes.data_options(data)}
  featurize, reference, _ = toy_features.load_or_train(
      images, labels, attributes, config.eval.toy_feature_steps,
      os.path.join(workdir, TOY_FEATURE_NET), trained_on, seed=0, log=log)
  return featurize, reference
