"""Toy reproduction of the paper's Tables 1 and 2 trends, with S_cross (docs/results.md).

  JAX_PLATFORMS=cpu python -m experiments.table1 --out=docs/toy_table1 --json=docs/table1.json

Trains and samples, for 3 seeds each, on the generated toy shapes
(groupdiff_jax/data/toy_shapes.py); the rows are experiments/table1_settings.py:

  Table 1 (trained)  baseline (C=1 UC=1: SiT with label dropout); GroupDiff-l
                     with similarity groups of UC = 2, 4, 8 (16 optional:
                     --settings=...,sim_uc16); UC = 4 random; UC = 4 class;
                     UC = 4 similarity with sigma_tv 100
  Table 2 (sampled)  the trained sim_uc4 model of the same seed with group
                     attention only in the first 0.2 / 0.4 / 0.6 of the
                     trajectory, or removed from the first / last third of
                     the blocks (inference-time changes, as the paper's)
  Diagnostics        (table 3, not in the paper) the trained baseline and
                     sim_uc4 sampled at CFG 1 (conditional branch alone)
                     and 1.5, and sim_uc4 without group attention at any
                     step

Quality: the Frechet distance (evaluation/fid.py) between the generated and
the real images in the 64-d feature space of a small CNN trained on the same
data (evaluation/toy_features.py: shape class, texture, colours, size,
position, rotation): "FD_toy", NOT comparable with ImageNet FID; also the
CNN's class accuracy on the samples (vs their conditioning classes).
meta.json holds the CNN's accuracy on held-out real images
(`evaluator_real_accuracy`) and their FD_toy (`fd_real_held_out`). S_cross
of the unconditional group branch on the sampler's own trajectory
(evaluation/s_cross.py, make_trajectory_sampler: every step's x_t with the ids the branch
drew), per step, per stage (STAGES) and per layer, with the attention's self
mass and the histogram of a_ij; beside it the re-noised probe of the final
samples (evaluation/s_cross.py, renoised_masses). Comparisons: paired over seeds,
95% t-interval and verdict (experiments/table1_stats.py).

Resume: every run writes <runs>/<setting>_seed<k>.json as it finishes
(default <out>/runs; a directory inside the repository survives sessions),
and a rerun with the same arguments skips it (other arguments: an error
naming the file). Trained models that a sampling-only row reuses are kept in
--params_dir (default <runs>/params, ~1.3 MB per model at the toy size;
a missing one is retrained from the config and seed; whether that is
bit-identical to the lost one is not checked). After every run the report
(--json, default <out>/table1.json: experiments/table1_report.py) and
<out>/table.md are rewritten, so a partial sweep is usable. Seeds are the
outer loop. One process: the jitted train step and sampler of a setting are
compiled once and reused by its seeds. Two processes on two cores may share
--out and --runs when they run disjoint (seed, setting) pairs (e.g. --seeds=0
and --seeds=1): the invocation log is merged under a lock and the report holds
every setting with runs. `--report_only` rewrites the report, table and
figures from the finished runs without training or sampling anything.
"""

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import shlex
import sys
import time
import uuid

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from configs import toy_table1
from experiments import plots, sweep_files, table1_report
from experiments.table1_settings import (DEFAULT_SETTINGS, SETTINGS, check_settings, setting_config,
                                         training_config)
from groupdiff_jax import errors, samplers, sharding, step_plan, train, train_step
from groupdiff_jax.data import toy_shapes
from groupdiff_jax.evaluation import s_cross, toy_features
from groupdiff_jax.models.dit import model_from_config
from groupdiff_jax.sample import group_labels, save_grid, to_uint8

STAGES = (0.0, 0.25, 0.5, 0.75)  # SiT time (0 = noise): starts of the stages S_cross is reported for
HELD_OUT_SEED = 1  # dataset seed of the held-out real images (classifier test, FD floor)


# --- One run -------------------------------------------------------------------
def train_run(config, model, mesh, cache, on_step=None, restore=None, save=None, save_every=0):
  """Train one run; `cache` holds the setting's jitted step (shared by its seeds).

  `on_step(steps_done, state)`, if given, is called after every step
  (experiments/toy_pilot.py evaluates the EMA model from it).
  Resuming (experiments/fashion_table1.py): `restore(state)` -> (state, losses
  so far) of an interrupted run, or None to start at step 0 (given the fresh
  state as a template); `save(state, losses)` is called every `save_every`
  steps (a multiple of train.log_every) before the last. Batches are a pure
  function of (seed, step), so a resumed run equals an uninterrupted one.
  """
  state, shardings = train_step.create_sharded_train_state(model, config, mesh, jax.random.PRNGKey(config.seed))
  if 'run_step' not in cache:
    cache['run_step'] = train_step.make_jitted_train_step(config, mesh, shardings)
    cache['template'] = state
  else:  # the first seed's static fields (apply_fn, tx: equal, but compared by identity), so its compile is reused
    state = cache['template'].replace(step=state.step, params=state.params, ema_params=state.ema_params,
                                      opt_state=state.opt_state, rng=state.rng)
  run_step = cache['run_step']
  kinds = step_plan.step_kinds(config.train.batch_size, config.train.group_size, config.train.group_ratio,
                               config.train.mode, config.train.mixed_steps)
  batches = train.make_batches(config)
  losses, window, start = [], [], 0
  restored = restore(state) if restore is not None else None
  if restored is not None:
    state = jax.tree.map(lambda fresh, saved: jax.device_put(saved, fresh.sharding), state, restored[0])
    losses, start = list(restored[1]), int(jax.device_get(state.step))
  if save is not None and save_every % config.train.log_every:
    raise ValueError(f'save_every={save_every} must be a multiple of train.log_every={config.train.log_every}.')
  for step in range(start, config.train.num_steps):
    name = step_plan.step_kind_name(config.seed, step, kinds, config.train.group_ratio)
    state, metrics = run_step(state, batches.batch(step, kinds[name]), kinds[name])
    window.append(metrics['loss'])
    if on_step is not None:
      on_step(step + 1, state)
    if (step + 1) % config.train.log_every == 0 or step + 1 == config.train.num_steps:
      losses.append(float(np.mean(jax.device_get(window))))
      window = []
    if save is not None and save_every and (step + 1) % save_every == 0 and step + 1 < config.train.num_steps:
      save(state, losses)
  return state, losses


def sample_run(config, model, params, cache, num_samples, chunk, probe_images):
  """(images uint8 [num_samples, H, W, C], labels [num_samples], trajectory S_cross, re-noised S_cross).

  The first chunk's first `probe_images` images (whole groups) are probed
  on the sampler's trajectory and, after sampling, by the re-noised probe;
  the S_cross reports are None for the baseline (no group branch), at CFG 1 (the group branch does not run)
  and where group attention is off at every step (sample.group_stage_fraction = 0).
  """
  per_group, group_size = config.sample.images_per_group, config.sample.uncond_group_size
  chunk = max(per_group, chunk // per_group * per_group)
  if 'sampler' not in cache:
    cache['sampler'] = s_cross.make_trajectory_sampler(model, config.model, config.sample)
  labels = np.asarray(group_labels(num_samples // per_group, per_group, config.model.num_classes))
  key, renoise_key = jax.random.split(jax.random.PRNGKey(config.seed + 1))
  shape = (config.model.input_size, config.model.input_size, config.model.in_channels)
  fraction = config.sample.group_stage_fraction
  grouped_branch_runs = group_size > 1 and config.sample.cfg_scale != 1.0  # CFG 1: the conditional singles alone
  grouped_somewhere = grouped_branch_runs and any(s_cross.group_attention_at(s, fraction) for s in STAGES)
  probe_images = min(probe_images, chunk) // group_size * group_size if grouped_somewhere else 0
  images, record, probed_x = [], None, None
  for i in range(0, len(labels), chunk):
    part = labels[i:i + chunk]
    if len(part) < chunk:  # keep one compiled shape: pad the last chunk
      part = np.resize(part, chunk)  # labels repeated: the padding is sampled and dropped
    noise_key, step_key = jax.random.split(jax.random.fold_in(key, i))
    x, chunk_record = cache['sampler'](params, jax.random.normal(noise_key, (chunk,) + shape), jnp.asarray(part),
                                       step_key, probe_images if i == 0 else 0)
    images.append(to_uint8(x)[:min(chunk, len(labels) - i)])
    if i == 0:
      record, probed_x = chunk_record, x[:probe_images]
  trajectory = renoised = None
  if probe_images:
    trajectory = s_cross.trajectory_report(record, STAGES, group_size)
    sample_config = config.sample.copy_and_resolve_references()
    with sample_config.unlocked():
      sample_config.s_cross_stages = STAGES
    layers, mass = s_cross.renoised_masses(model, params, probed_x, labels[:probe_images], renoise_key,
                                           sample_config, config.model)
    renoised = s_cross.renoised_report(layers, mass, sample_config)
  return np.concatenate(images), labels, trajectory, renoised


def config_hash(config, **extra):
  """Short digest of a run's config and the sampling arguments: a resumed sweep only skips its own runs."""
  text = json.dumps({'config': config.to_dict(), **extra}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_finished(path, expected_hash, feature_steps=toy_features.DEFAULT_TRAIN_STEPS):
  """True when `path` holds a finished run of this config, scored by an evaluator of `feature_steps`; an error
  when it holds another config's or another evaluator's (its FD would not be comparable)."""
  if not os.path.exists(path):
    return False
  record = errors.read_json_object(path, errors.DataError, 'delete the file to redo the run.')
  found = record.get('config_hash')
  if found != expected_hash:
    raise errors.UserError(f'{path} holds a run of another config (config_hash {found}, this sweep '
                           f'{expected_hash}): resume with the arguments it was started with, or pass another '
                           '--runs directory (or delete the file to redo the run).')
  scored_by = record.get('feature_steps', toy_features.DEFAULT_TRAIN_STEPS)  # runs before the field: the default
  if scored_by != feature_steps:
    raise errors.UserError(f'{path} was scored by an evaluator of {scored_by} training steps, this sweep '
                           f'--feature_steps={feature_steps}: resume with --feature_steps={scored_by}, or pass '
                           'another --runs directory.')
  return True


# --- The sweep -----------------------------------------------------------------
def run_sweep(args, base, settings, seeds, featurize, reference, evaluator_accuracy, on_run_done):
  """Every (seed, setting) run not yet in args.runs; `on_run_done(record)` after each."""
  mesh = sharding.make_mesh()
  caches = {name: {} for name in settings}
  trained_caches = {}
  params_dir = args.params_dir
  # Kept for every row that any sampling-only row reuses, whether or not this invocation runs that row: a
  # later invocation (another seed range, the diagnostics) then samples from it without training again.
  sources = {setting.trained_from for setting in SETTINGS.values()} - {None}
  sample_args = dict(num_samples=args.num_samples, chunk=args.chunk, probe_images=args.probe_images)

  def params_path(name, seed):  # named by the training config's digest: another config never loads it
    return os.path.join(params_dir, f'{name}_seed{seed}_{config_hash(training_config(base, name, seed))}.msgpack')

  def train_and_keep(name, seed):
    config = setting_config(base, name, seed, args.num_samples)
    cache = trained_caches.setdefault(name, {})
    model = cache.setdefault('model', model_from_config(config.model))
    tic = time.time()
    state, losses = train_run(config, model, mesh, cache)
    if name in sources:
      os.makedirs(params_dir, exist_ok=True)
      table1_report.write_bytes(params_path(name, seed), flax.serialization.to_bytes(jax.device_get(state.ema_params)))
    return state.ema_params, losses, time.time() - tic

  for seed in seeds:
    for name in settings:
      setting = SETTINGS[name]
      config = setting_config(base, name, seed, args.num_samples)
      run_hash = config_hash(config, **sample_args)
      path = os.path.join(args.runs, f'{name}_seed{seed}.json')
      if check_finished(path, run_hash, args.feature_steps):
        continue
      if setting.trained_from and os.path.exists(params_path(setting.trained_from, seed)):
        with open(params_path(setting.trained_from, seed), 'rb') as f:
          params, losses, train_seconds = flax.serialization.msgpack_restore(f.read()), None, 0.0
      else:  # a trained row, or a sampling-only row whose trained model is not on disk (retrained, kept)
        params, losses, train_seconds = train_and_keep(setting.trained_from or name, seed)
      model = caches[name].setdefault('model', model_from_config(config.model))
      tic = time.time()
      samples, sample_labels, trajectory, renoised = sample_run(config, model, params, caches[name],
                                                                args.num_samples, args.chunk, args.probe_images)
      sample_seconds = time.time() - tic
      scores = toy_features.score_samples(featurize, samples, sample_labels, reference)
      record = {'setting': name, 'seed': seed, 'config_hash': run_hash, 'feature_steps': args.feature_steps,
                'fd': float(scores['fd']),
                'class_accuracy': scores['class_accuracy'], 's_cross': trajectory,
                's_cross_renoised': renoised, 'evaluator_real_accuracy': evaluator_accuracy,
                'group_layers': list(config.model.group_layers) if config.model.group_layers else None,
                'group_stage_fraction': config.sample.group_stage_fraction,
                'final_loss': losses[-1] if losses else None, 'losses': losses, 'train_seconds': train_seconds,
                'sample_seconds': sample_seconds, 'num_samples': len(samples),
                'nfe_per_branch': samplers.number_of_function_evaluations(config.sample.num_steps,
                                                                          config.sample.sampler)}
      grid_path = os.path.join(args.out, f'samples_{name}.png')
      if seed == 0 or not os.path.exists(grid_path):  # seed 0's grid, whichever invocation runs it
        per_group = config.sample.images_per_group  # one jointly generated group per row, one class per row
        save_grid(samples[:10 * per_group], per_group, grid_path)
      table1_report.write_json(path, record)
      has_s_cross = trajectory and trajectory['mean_percent'] is not None
      s_cross_text = f"{trajectory['mean_percent']:.2f}%" if has_s_cross else '-'
      print(f"{name} seed {seed}: FD_toy {record['fd']:.3f}, class acc {record['class_accuracy']:.3f}, S_cross "
            f"{s_cross_text}; train {train_seconds:.0f} s, sample {sample_seconds:.0f} s.", flush=True)
      on_run_done(record)


# --- Main ------------------------------------------------------------------------
def add_config_flags(parser):
  """Flags that change configs/toy_table1.py or the scoring (shared with experiments/toy_pilot.py)."""
  parser.add_argument('--num_steps', type=int, default=None, help='training steps (default: the config)')
  parser.add_argument('--num_samples', type=int, default=512)
  parser.add_argument('--sample_steps', type=int, default=None, help='sampler steps (default: the config)')
  parser.add_argument('--sampler', default=None, help="'euler' | 'heun' (default: the config)")
  parser.add_argument('--cfg_scale', type=float, default=None, help='guidance scale (default: the config)')
  parser.add_argument('--chunk', type=int, default=512, help='images sampled per jitted call')
  parser.add_argument('--num_images', type=int, default=None, help='toy dataset size (default: the config)')
  parser.add_argument('--variant', default=None, help="model variant, e.g. 'SiT-S/2' for patch 2 (default: config)")
  parser.add_argument('--hidden_size', type=int, default=None)
  parser.add_argument('--depth', type=int, default=None)
  parser.add_argument('--batch_size', type=int, default=None)
  parser.add_argument('--lr', type=float, default=None, help='learning rate (default: the config)')
  parser.add_argument('--feature_steps', type=int, default=toy_features.DEFAULT_TRAIN_STEPS,
                      help='training steps of the scoring feature net (evaluation/toy_features.py)')
  parser.add_argument('--held_out', type=int, default=2048, help='held-out real images (scorer test, FD floor)')
  parser.add_argument('--textures', default=None,
                      help="comma-separated toy shape textures, e.g. 'solid' (default: the config)")
  parser.add_argument('--size_range', default=None, help="toy shape sizes 'low,high', e.g. '0.5,0.8' (default: config)")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='output folder (meta.json, table.md, grids, plots)')
  parser.add_argument('--runs', default=None, help='per-run JSON folder (default <out>/runs); resumable')
  parser.add_argument('--json', default=None, help='report path (default <out>/table1.json)')
  parser.add_argument('--params_dir', default=None,
                      help='trained models the Table 2 rows reuse (default <runs>/params; missing ones are retrained)')
  parser.add_argument('--settings', default=','.join(DEFAULT_SETTINGS),
                      help=f'comma-separated names of {list(SETTINGS)}')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--probe_images', type=int, default=256, help='images probed for S_cross')
  parser.add_argument('--report_only', action='store_true',
                      help='rewrite the report, table and figures from the finished runs; train and sample nothing')
  add_config_flags(parser)
  args = parser.parse_args(argv)
  args.runs = args.runs or os.path.join(args.out, 'runs')
  args.json = args.json or os.path.join(args.out, 'table1.json')
  args.params_dir = args.params_dir or os.path.join(args.runs, 'params')
  return args


def base_config(args):
  config = toy_table1.get_config()
  with config.unlocked():
    for value, section, key in ((args.num_steps, 'train', 'num_steps'), (args.sample_steps, 'sample', 'num_steps'),
                                (args.num_images, 'data', 'num_images'), (args.hidden_size, 'model', 'hidden_size'),
                                (args.depth, 'model', 'depth'), (args.batch_size, 'train', 'batch_size'),
                                (args.sampler, 'sample', 'sampler'), (args.cfg_scale, 'sample', 'cfg_scale'),
                                (args.variant, 'model', 'variant'), (args.lr, 'optim', 'lr')):
      if value is not None:
        config[section][key] = value
    if args.textures is not None:
      config.data.textures = args.textures
    if args.size_range is not None:
      try:
        config.data.size_range = tuple(float(s) for s in args.size_range.split(','))
      except ValueError:
        raise errors.ConfigError(f"--size_range must be 'low,high' numbers; got {args.size_range!r}.") from None
  toy_shapes.data_options(config.data)  # a bad --textures / --size_range fails here, before any work
  return config


def read_json(path, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  start = time.time()
  for directory in (args.out, args.runs):
    os.makedirs(directory, exist_ok=True)
  settings = check_settings([s for s in args.settings.split(',') if s])
  seeds = [int(s) for s in args.seeds.split(',') if s]
  if args.report_only:
    return write_report_and_figures(args, read_json(os.path.join(args.out, 'invocations.json'), []))
  base = base_config(args)
  data = base.data

  # --- Data, feature network, reference statistics ------------------------------
  options = toy_shapes.data_options(data)
  images, labels, attributes, _ = toy_shapes.load_toy_shapes(data.num_images, data.dataset_seed, data.image_size,
                                                             data.embedding_dims, data.num_neighbors, **options)
  held_images, held_labels, _ = toy_shapes.make_shapes(args.held_out, HELD_OUT_SEED, data.image_size, **options)
  featurize, reference, _ = toy_features.load_or_train(images, labels, attributes, args.feature_steps)
  real = toy_features.evaluate_real(featurize, held_images, held_labels, reference)
  meta = {'evaluator_real_accuracy': real['accuracy'], 'fd_real_held_out': real['fd'],
          'held_out_images': args.held_out, 'held_out_dataset_seed': HELD_OUT_SEED,
          'feature_steps': args.feature_steps,
          'num_images': data.num_images, 'num_samples': args.num_samples,
          'config': base.to_dict(), 'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, '
                                               f'{jax.devices()[0].platform}'}
  # What every invocation sharing --out has in common (per-invocation facts go to invocations.json). The
  # evaluator is a pure function of the data and --feature_steps: another one's numbers mean the runs' FD are
  # not comparable.
  meta_path = os.path.join(args.out, 'meta.json')
  previous = read_json(meta_path, {})
  if previous.get('evaluator_real_accuracy', real['accuracy']) != real['accuracy']:
    logging.warning('%s: an earlier invocation\'s evaluator scored %.6f on the held-out images, this one %.6f: '
                    'its runs were scored by another network.', meta_path, previous['evaluator_real_accuracy'],
                    real['accuracy'])
  table1_report.write_json(meta_path, meta)
  setup_seconds = time.time() - start
  print(f"Evaluator: held-out real accuracy {real['accuracy']:.3f}; FD_toy of {args.held_out} real held-out "
        f"images: {real['fd']:.3f} (setup {setup_seconds:.0f} s).", flush=True)

  # --- Runs -----------------------------------------------------------------------
  invocations_path = os.path.join(args.out, 'invocations.json')
  invocation = {'command': 'python -m experiments.table1 ' + shlex.join(sys.argv[1:] if argv is None else argv),
                'started_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}',
                'seeds': seeds, 'settings': settings, 'setup_seconds': setup_seconds, 'wall_seconds': 0.0,
                'runs': [], 'id': uuid.uuid4().hex, 'pid': os.getpid()}

  def report():
    # Under a lock and re-read: another invocation over other seeds or settings may share the folder. The
    # report holds every setting with runs, not only this invocation's.
    invocation['wall_seconds'] = time.time() - start
    with sweep_files.exclusive(invocations_path):
      invocations = sweep_files.merge_invocation(read_json(invocations_path, []), invocation)
      table1_report.write_json(invocations_path, invocations)
      result = build_report(args, invocations)
    return result

  def on_run_done(record):
    invocation['runs'].append(f"{record['setting']}_seed{record['seed']}")
    report()

  evaluator_accuracy = meta['evaluator_real_accuracy']
  run_sweep(args, base, settings, seeds, featurize, reference, evaluator_accuracy, on_run_done)
  report()
  result = write_report_and_figures(args, read_json(invocations_path, []))
  print(f'Wall time {time.time() - start:.0f} s.')
  return result


def build_report(args, invocations):
  """docs/table1.json and <out>/table.md from every finished run in args.runs (all settings, in SETTINGS order)."""
  result = table1_report.build_report(table1_report.load_runs(args.runs), read_json(
      os.path.join(args.out, 'meta.json'), {}), invocations, list(SETTINGS))
  table1_report.write_report(result, args.json, os.path.join(args.out, 'table.md'))
  return result


def write_report_and_figures(args, invocations):
  result = build_report(args, invocations)
  plots.table1_figures(result, args.out)
  print(table1_report.markdown_table(result))
  print(f'Report: {os.path.abspath(args.json)}')
  return result


if __name__ == '__main__':
  main()
