"""The training loop: data, model, jitted group steps, metrics, checkpoints."""

import logging
import os
import time

import jax
import numpy as np
from clu import metric_writers, periodic_actions
from tqdm import tqdm

from groupdiff_jax import checkpoint, sharding, step_plan
from groupdiff_jax import train_step as train_step_lib
from groupdiff_jax.models.dit import model_from_config

DATASETS = ('digits',)


def make_batches(config):
  """The batch source named by config.data.name."""
  if config.data.name == 'digits':
    from groupdiff_jax.data.digits import DigitsBatches
    data_config = config.data.copy_and_resolve_references()
    with data_config.unlocked():
      data_config.batch_size = config.train.batch_size
    return DigitsBatches(data_config, config.seed)
  raise ValueError(f'config.data.name={config.data.name!r} has no input pipeline in this version; '
                   f'available: {DATASETS}. (The ImageNet latent-store pipeline is a separate job: see README.)')


def train_and_evaluate(config, workdir):
  """Train per `config`, writing metrics and checkpoints to `workdir`.

  Returns the final TrainState.
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  # --- Mesh and input --------------------------------------------------------
  mesh = sharding.make_mesh()
  kinds = step_plan.step_kinds(config.train.batch_size, config.train.group_size, config.train.group_ratio,
                               config.train.mode, config.train.mixed_steps)
  for kind in kinds.values():
    sharding.check_groups_fit_mesh(kind, mesh)
  if config.train.group_size > config.model.max_group_size > 0:
    raise ValueError(f'train.group_size={config.train.group_size} exceeds model.max_group_size='
                     f'{config.model.max_group_size} (one sample-embedding row per member).')
  batches = make_batches(config)

  # --- Model, state and sharding ---------------------------------------------
  model = model_from_config(config.model)
  state_sharding = sharding.replicated(mesh)
  create = jax.jit(lambda key: train_step_lib.create_train_state(model, config, key), out_shardings=state_sharding)
  state = create(jax.random.PRNGKey(config.seed))
  param_count = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model %s: %s parameters.', config.model.variant, f'{param_count:,}')

  # --- Checkpoint ------------------------------------------------------------
  manager = checkpoint.checkpoint_manager(workdir, config.train.max_checkpoints)
  state = checkpoint.restore_latest(manager, state)
  start_step = int(jax.device_get(state.step))
  if start_step:
    logging.info('Resumed from step %d in %s.', start_step, manager.directory)

  # --- Loop ------------------------------------------------------------------
  run_step = train_step_lib.make_jitted_train_step(config, mesh, state_sharding)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  report = periodic_actions.ReportProgress(num_train_steps=config.train.num_steps, writer=writer,
                                           every_steps=config.train.log_every)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
  pending = []
  progress = tqdm(range(start_step, config.train.num_steps), initial=start_step, total=config.train.num_steps,
                  desc='train', disable=not is_main, unit='step')
  last_log = time.time()
  for step in progress:
    name = step_plan.step_kind_name(config.seed, step, kinds, config.train.group_ratio)
    batch = batches.batch(step, kinds[name])
    state, metrics = run_step(state, batch, kinds[name])
    pending.append(metrics)
    report(step + 1)
    if (step + 1) % config.train.log_every == 0 or step + 1 == config.train.num_steps:
      summary = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
      summary['steps_per_sec'] = len(pending) / max(time.time() - last_log, 1e-9)
      if not np.isfinite(summary['loss']):
        raise FloatingPointError(f'Loss is {summary["loss"]} at step {step + 1}; lower optim.lr or check the data.')
      writer.write_scalars(step + 1, summary)
      progress.set_postfix(loss=f'{summary["loss"]:.4f}')
      pending, last_log = [], time.time()
    if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == config.train.num_steps:
      checkpoint.save(manager, state)
  manager.wait_until_finished()
  writer.flush()
  if is_main:
    print(f'Metrics (TensorBoard): {os.path.abspath(workdir)}\nCheckpoints: {manager.directory}')
  return state
