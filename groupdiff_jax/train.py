"""The training loop: data, model, jitted group steps, metrics, checkpoints."""

import inspect
import signal
import time

import jax
import numpy as np
from absl import logging

from groupdiff_jax import checkpoint, converted, errors, preemption, run_log, sharding, step_plan, storage
from groupdiff_jax import train_monitor
from groupdiff_jax import validation
from groupdiff_jax import train_step as train_step_lib
from groupdiff_jax.models.dit import model_from_config
from groupdiff_jax.progress import Progress

DATASETS = ('digits', 'toy_shapes', 'fashion_mnist')


def make_batches(config):
  """The batch source named by config.data.name."""
  if config.data.name in ('digits', 'toy_shapes', 'fashion_mnist'):
    from groupdiff_jax.data.digits import DigitsBatches
    from groupdiff_jax.data.fashion_mnist import FashionBatches
    from groupdiff_jax.data.toy_shapes import ToyShapesBatches
    source = {'digits': DigitsBatches, 'toy_shapes': ToyShapesBatches, 'fashion_mnist': FashionBatches}[config.data.name]
    return source(config, config.seed)
  if config.data.name in ('latents', 'imagenet_latents'):
    from groupdiff_jax.data import pipeline
    # Single host: batches are placed on the devices ahead of time. Several
    # hosts: each assembles only its slice, made global by the pipeline.
    batch_sharding = sharding.batch_sharding(sharding.config_mesh(config))
    return pipeline.from_config(config, jax.process_index(), jax.process_count(), batch_sharding)
  raise errors.ConfigError(f'config.data.name={config.data.name!r} has no input pipeline in this version; '
                   f'available: {DATASETS + ("latents",)}.')


LATENT_HELP = """Produce them with the data jobs (README, "ImageNet data (latents, embeddings, neighbours)"):
  python -m groupdiff_jax.data.extract_latents_job --vae_path=.../sd-vae-ft-ema/diffusion_pytorch_model.safetensors \\
      --manual_dir=DIR_WITH_ILSVRC2012_TARS --output_dir={latent_dir}
  python -m groupdiff_jax.data.embeddings_job --encoder=dinov2_l14 --weights=.../dinov2-large --output_dir=EMB_DIR
  python -m groupdiff_jax.data.neighbors_job --embeddings_dir=EMB_DIR --output_dir={neighbors_dir} --k=100
then pass --config.data.latent_dir=... --config.data.neighbors_dir=..."""
LOCAL_HELP = ('the latent store and neighbour lists are memory-mapped. Copy them to the same local path on every '
              'host first, e.g. `gcloud storage cp -r gs://BUCKET/latents /data/` (launch/tpu_pod.sh does it with '
              'LATENTS_URI=... LOCAL_LATENTS=...), and pass that local path.')


def check_data(config):
  """Fail fast (before the mesh, model or compile) when the data are missing."""
  if config.data.name not in ('latents', 'imagenet_latents'):
    return
  data = config.data
  latent_dir, neighbors_dir = data.latent_dir, data.neighbors_dir
  for field, value in (('config.data.latent_dir', latent_dir), ('config.data.neighbors_dir', neighbors_dir)):
    storage.require_local(value, field, LOCAL_HELP)
  missing = [str(storage.path(latent_dir) / f) for f in ('latents.npy', 'labels.npy')
             if not (storage.path(latent_dir) / f).exists()]
  if data.grouping in ('official_plan', 'tau_random'):
    path = storage.path(neighbors_dir) / 'neighbors.npy'
    missing += [] if path.exists() else [str(path)]
  if missing:
    raise errors.MissingInputError(f'config.data.name={data.name!r} needs the ImageNet latent store and neighbour lists: '
                            f'{", ".join(missing)} not found.\n'
                            + LATENT_HELP.format(latent_dir=latent_dir or 'LATENT_DIR',
                                                 neighbors_dir=neighbors_dir or 'NEIGHBORS_DIR'))


def host_batch(batches, step, kind, mesh):
  """Step `step`'s batch as this process feeds it.

  One process: the batch source's numpy batch (the jitted step shards it).
  Several: each process reads only its own rows, whole groups (see
  sharding.host_batch_slice), and the global arrays are assembled with
  `jax.make_array_from_process_local_data`. A source built for this host
  (attribute `process_count`, e.g. data/pipeline.py) returns them itself; one
  whose `batch(step, kind, process_index=, process_count=)` takes the process
  reads only the groups [i*G/n, (i+1)*G/n) of each sub-batch; one without
  it (the digits demo) draws the global batch and keeps this host's rows.
  """
  count = jax.process_count()
  if count == 1 or getattr(batches, 'process_count', None) == count:
    return batches.batch(step, kind)  # one host, or a source that already reads only its slice
  rows = [sharding.host_batch_slice(mesh, sub.num_images) for sub in kind]
  if 'process_index' in inspect.signature(batches.batch).parameters:
    index = jax.process_index()
    expected = [(index * sub.num_images // count, (index + 1) * sub.num_images // count) for sub in kind]
    if rows != expected:
      raise ValueError(f'Process {index} feeds rows {rows} of the batch but the batch source reads {expected}.')
    local = batches.batch(step, kind, process_index=index, process_count=count)
  else:
    local = tuple({k: v[start:stop] for k, v in part.items()}
                  for part, (start, stop) in zip(batches.batch(step, kind), rows))
  return sharding.global_batch(local, mesh, [sub.num_images for sub in kind])


def train_and_evaluate(config, workdir, write_samples=None):
  """Train per `config`, writing metrics and checkpoints to `workdir`.

  write_samples: what makes the samples scored every train.eval_every steps
  (main.py passes sample_job.sample_and_save; train_monitor.TrainMonitor).

  Returns the final TrainState; on preemption (SIGTERM), or a first Ctrl-C
  once the step is compiled (with preemption.Interrupts installed, as by
  main.py), it saves and returns early, with state.step <
  config.train.num_steps.
  """
  check_data(config)
  train_monitor.check_config(config)  # profile_steps, sample_every, eval_every
  is_main = jax.process_index() == 0

  # --- Mesh and input --------------------------------------------------------
  mesh = sharding.config_mesh(config)
  logging.info('Mesh %s over %d process(es); batch split by group over %s.', dict(mesh.shape), jax.process_count(),
               sharding.BATCH_AXES)
  kinds = validation.check_before_training(config, workdir, mesh)
  batches = make_batches(config)

  # --- Model, state and sharding ---------------------------------------------
  model = model_from_config(config.model)
  state, state_sharding = train_step_lib.create_sharded_train_state(model, config, mesh,
                                                                     jax.random.PRNGKey(config.seed))
  param_count = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model %s: %s parameters.', config.model.variant, f'{param_count:,}')

  # --- Checkpoint ------------------------------------------------------------
  # The newest checkpoint that restores (unreadable ones are moved aside with
  # a warning): params, EMA, optimizer state, step and base PRNG key. Batches
  # and step kinds are pure functions of (seed, step), so the resumed run is
  # bit-identical to an uninterrupted one. A new workdir with train.init_from
  # starts at step 0 from that checkpoint's weights (fine-tuning imported or
  # pretrained weights); once this run has saved, resuming takes precedence.
  manager = checkpoint.checkpoint_manager(workdir, config.train.max_checkpoints)
  state = checkpoint.restore_latest(manager, state)
  start_step = int(jax.device_get(state.step))
  init_from = config.train.init_from
  if start_step:
    logging.info('Resumed from step %d in %s%s.', start_step, manager.directory,
                 f' (train.init_from={init_from} is not used again)' if init_from else '')
  elif init_from:
    converted.check_model_config(init_from, config.model)
    state = checkpoint.init_params_from(state, init_from)

  # --- Loop ------------------------------------------------------------------
  run_step = train_step_lib.make_jitted_train_step(config, mesh, state_sharding)
  writer, summary_writer = run_log.make_writer(workdir, is_main)
  monitor = train_monitor.TrainMonitor(config, workdir, writer, model, write_samples=write_samples)
  monitor.write_config(summary_writer, start_step)
  guard = NonfiniteGuard(config.train.max_nonfinite_steps)
  pending = []
  progress = Progress('train', config.train.num_steps, 'steps', initial=start_step, show=is_main)
  last_log = time.time()
  # checkpoint.saving: an exception that ends the loop first finishes (or reports) the in-flight save.
  with checkpoint.saving(manager), preemption.PreemptionWatch(manager) as watch:
    if start_step == 0 and config.train.signal_at_step == 0:
      send_test_signal(config)
    for step in range(start_step, config.train.num_steps):
      monitor.before_step(step)
      name = step_plan.step_kind_name(config.seed, step, kinds, config.train.group_ratio)
      batch = host_batch(batches, step, kinds[name], mesh)
      if step == config.train.poison_step:
        batch = poisoned(batch)
      state, metrics = run_step(state, batch, kinds[name])
      watch.arm_interrupts()  # compiled: a first Ctrl-C now saves at the step reached
      checkpoint.check_save(manager)  # a failed background write stops the run at once, naming the path
      guard.push(step + 1, metrics['nonfinite'])
      pending.append(metrics)
      if (step + 1) % config.train.log_every == 0 or step + 1 == config.train.num_steps:
        summary = summarize(pending)
        summary['steps_per_sec'] = len(pending) / max(time.time() - last_log, 1e-9)
        summary.update(run_log.memory_scalars())
        writer.write_scalars(step + 1, summary)
        progress.set_postfix(loss=f'{summary["loss"]:.4f}')
        pending, last_log = [], time.time()
      progress(step + 1)
      last_log += monitor.after_step(step + 1, state)  # grids and FID do not count as training time
      if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == config.train.num_steps:
        checkpoint.save(manager, state, config=config)
      if step + 1 == config.train.signal_at_step:
        send_test_signal(config)
      if watch.stop_at(step + 1):
        checkpoint.save(manager, state, force=True, config=config)
        logging.warning('%s after step %d: its checkpoint is saved in %s; rerun the same command to resume.',
                        'Interrupted (SIGINT)' if watch.signal_received == 'SIGINT' else 'Preempted', step + 1,
                        manager.directory)
        break
    guard.flush()
  monitor.close()
  progress.close()
  if hasattr(batches, 'close'):
    batches.close()  # the latent pipeline's tf.data stream
  manager.wait_until_finished()
  writer.flush()
  if is_main:
    print(f'Metrics (TensorBoard): {storage.path(workdir)}\nCheckpoints: {manager.directory}')
  return state


def send_test_signal(config):
  """The process signals itself config.train.signal_name (config.train.signal_at_step: tests Ctrl-C and
  preemption at a known step, as a user or a scheduler would)."""
  signal.raise_signal(signal.Signals[config.train.signal_name])


def poisoned(batch):
  """`batch` with NaN images (config.train.poison_step: tests the non-finite guard)."""
  return tuple({k: v * np.float32(np.nan) if k == 'images' else v for k, v in part.items()} for part in batch)


def summarize(metrics):
  """Means of a window of step metrics; loss and grad_norm over the finite steps only.

  `nonfinite_steps` counts the window's skipped steps.
  """
  values = {k: np.array([jax.device_get(m[k]) for m in metrics]) for k in metrics[0]}
  skipped = values.pop('nonfinite')
  finite = skipped == 0
  summary = {k: float(v[finite].mean()) if finite.any() else float('nan') for k, v in values.items()}
  summary['nonfinite_steps'] = int(skipped.sum())
  return summary


class NonfiniteGuard:
  """Stops training after `limit` skipped (non-finite) steps in a row.

  Each step's flag is read one step late, when the next step is already
  dispatched, so the check costs no host-device sync in the loop.
  """

  def __init__(self, limit):
    self.limit = limit
    self.in_a_row = 0
    self._last = None

  def push(self, step, nonfinite):
    last, self._last = self._last, (step, nonfinite)
    if last is not None:
      self._check(*last)

  def flush(self):
    last, self._last = self._last, None
    if last is not None:
      self._check(*last)

  def _check(self, step, nonfinite):
    if not int(jax.device_get(nonfinite)):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    logging.warning('Step %d: the loss or gradient norm is not finite; its update was skipped (%d in a row).',
                    step, self.in_a_row)
    if self.in_a_row >= self.limit:
      raise FloatingPointError(
          f'{self.in_a_row} steps in a row up to step {step} had a non-finite loss or gradient norm (updates '
          f'skipped; train.max_nonfinite_steps={self.limit}). Lower optim.lr, check the data, or resume from an '
          f'earlier checkpoint.')
