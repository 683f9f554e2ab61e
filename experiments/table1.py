"""Toy reproduction of the paper's Table 1 trends, with S_cross (docs/results.md).

  JAX_PLATFORMS=cpu python -m experiments.table1 --out=/tmp/table1   # from the repository root

Trains and samples, for 3 seeds each, on the generated toy shapes
(groupdiff_jax/data/toy_shapes.py, 20k 16x16 RGB images):

  baseline       C=1 UC=1: no groups (SiT with 20% label dropout)
  sim_uc2/4/8    GroupDiff-l, similarity grouping (official epoch plan over
                 PCA-of-pixels neighbour lists), unconditional groups of 2/4/8
  random_uc4     GroupDiff-l, random groups of 4
  class_uc4      GroupDiff-l, same-class groups of 4
  sim_uc4_tv100  sim_uc4 with intra-group timestep variance 0.1 (= 100/1000)

Quality: the Frechet distance (evaluation/fid.py) between the generated and
the real images in the 64-d feature space of a small CNN that this script
trains on the same data (evaluation/toy_features.py: shape class, texture,
colours, size, position, rotation): "FD_toy", NOT comparable with ImageNet
FID. Also the CNN's class accuracy on the samples (vs their conditioning
classes). meta.json holds the CNN's accuracy on held-out real images
(`evaluator_real_accuracy`) and their FD_toy (`fd_real_held_out`).
Grouped settings: S_cross (evaluation/s_cross_probe.py) of the
unconditional group branch at 4 stages of the sampling trajectory (t = 0,
0.25, 0.5, 0.75 in SiT time, 0 = noise).

Every run writes <out>/runs/<setting>_seed<k>.json as it finishes (a rerun
skips finished runs), then <out>/results.json and <out>/table.md are
rewritten, so a partial sweep is usable. Seeds are the outer loop, so a
partial sweep covers every setting once before any twice. One process: the
jitted train step and sampler of a setting are compiled once and reused by
its seeds.
"""

import argparse
import json
import logging
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import toy_table1
from groupdiff_jax import samplers, sharding, step_plan, train, train_step
from groupdiff_jax import transport as transport_lib
from groupdiff_jax.data import toy_shapes
from groupdiff_jax.evaluation import fid, s_cross_probe, toy_features
from groupdiff_jax.models.dit import model_from_config
from groupdiff_jax.models.embeddings import draw_sample_ids
from groupdiff_jax.sample import group_labels, save_grid, to_uint8

# name: (uncond group size UC, grouping, timestep_jitter); Table 1's rows.
SETTINGS = {
    'baseline': (1, None, 0.0),
    'sim_uc2': (2, 'official_plan', 0.0),
    'sim_uc4': (4, 'official_plan', 0.0),
    'sim_uc8': (8, 'official_plan', 0.0),
    'random_uc4': (4, 'random', 0.0),
    'class_uc4': (4, 'class', 0.0),
    'sim_uc4_tv100': (4, 'official_plan', 0.1),
}
DESCRIPTIONS = {
    'baseline': 'Baseline (C=1, UC=1)',
    'sim_uc2': 'C=1, UC=2, similarity',
    'sim_uc4': 'C=1, UC=4, similarity',
    'sim_uc8': 'C=1, UC=8, similarity',
    'random_uc4': 'C=1, UC=4, random',
    'class_uc4': 'C=1, UC=4, class',
    'sim_uc4_tv100': 'C=1, UC=4, similarity + sigma_tv 100',
}
STAGES = (0.0, 0.25, 0.5, 0.75)  # SiT time (0 = noise) where S_cross is probed; also segment starts
HELD_OUT_SEED = 1  # dataset seed of the held-out real images (classifier test, FD floor)


# --- Settings ------------------------------------------------------------------

def setting_config(base, name, seed, num_samples):
  """The config of one run: Table 1 row `name`, seed `seed`."""
  group_size, grouping, jitter = SETTINGS[name]
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.seed = seed
    if group_size == 1:  # plain SiT: no groups, no sample embedding, label dropout is the CFG dropout
      config.train.label_dropout = base.train.group_ratio
      config.train.group_ratio = 0.0
      config.train.group_size = 1
      config.model.max_group_size = 0
      config.data.grouping = 'random'  # unused: no group steps
    else:
      config.train.group_size = group_size
      config.model.max_group_size = group_size
      config.data.grouping = grouping
      config.train.timestep_jitter = jitter
    per_group = group_size if group_size > 1 else 4
    config.sample.images_per_group = per_group
    config.sample.cond_group_size = 1
    config.sample.uncond_group_size = group_size
    config.sample.num_groups = num_samples // per_group
  return config


def make_sampler(model, config, probe_images):
  """jitted (params, noise [B,H,W,C], labels [B], key) -> (images, S_cross masses).

  GroupDiff-l inference: conditional branch per image, unconditional branch
  over groups of UC, CFG. The ODE is integrated in segments between STAGES,
  and before each segment the unconditional group branch of the first
  `probe_images` images is probed (masses [stages, layers, G, N, N]; none
  for the baseline). Same steps as one uninterrupted fixed-step run.
  """
  sample_config, model_config = config.sample, config.model
  guidance = samplers.guidance_from_config(sample_config)
  transport = transport_lib.transport_from_config(model_config)
  group_size = sample_config.uncond_group_size
  bounds = STAGES + (1.0,)
  steps = sample_config.num_steps
  if steps % len(STAGES):
    raise ValueError(f'sample.num_steps={steps} must be a multiple of {len(STAGES)} (the probed stages).')
  null_class = model_config.num_classes

  @jax.jit
  def segment(params, x, labels, key, t0, t1):  # t0, t1 traced: one compile for every segment
    velocity = samplers.make_velocity_fn(model.apply, params, labels, guidance, transport=transport,
                                         null_class=null_class, max_group_size=model_config.max_group_size,
                                         data_channels=model_config.in_channels)
    return samplers.integrate_ode(velocity, x, key, steps // len(STAGES), sample_config.sampler, t0, t1)

  @jax.jit
  def probe(params, x, key, t):  # the unconditional group branch: null labels, groups of UC
    ids = draw_sample_ids(key, x.shape[0] // group_size, group_size, model_config.max_group_size)
    return s_cross_probe.member_masses(model, params, x, jnp.full((x.shape[0],), t),
                                       jnp.full((x.shape[0],), null_class), ids, group_size=group_size)[1]

  def run(params, noise, labels, key):
    x, masses = noise, []
    for i, (t0, t1) in enumerate(zip(bounds[:-1], bounds[1:])):
      if group_size > 1 and probe_images:
        masses.append(probe(params, x[:probe_images], jax.random.fold_in(key, 1000 + i), t0))  # [layers, G, N, N]
      x = segment(params, x, labels, jax.random.fold_in(key, i), t0, t1)
    return x, (jnp.stack(masses) if masses else jnp.zeros((0,)))

  return run


# --- One run -------------------------------------------------------------------

def train_run(config, model, mesh, cache, on_step=None):
  """Train one run; `cache` holds the setting's jitted step (shared by its seeds).

  `on_step(steps_done, state)`, if given, is called after every step
  (experiments/toy_pilot.py evaluates the EMA model from it).
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
  losses, window = [], []
  for step in range(config.train.num_steps):
    name = step_plan.step_kind_name(config.seed, step, kinds, config.train.group_ratio)
    state, metrics = run_step(state, batches.batch(step, kinds[name]), kinds[name])
    window.append(metrics['loss'])
    if on_step is not None:
      on_step(step + 1, state)
    if (step + 1) % config.train.log_every == 0 or step + 1 == config.train.num_steps:
      losses.append(float(np.mean(jax.device_get(window))))
      window = []
  return state, losses


def sample_run(config, model, params, cache, num_samples, chunk, probe_images):
  """(images uint8 [num_samples, H, W, C], S_cross summary or None)."""
  per_group = config.sample.images_per_group
  chunk = max(per_group, chunk // per_group * per_group)
  if 'sampler' not in cache:
    cache['sampler'] = make_sampler(model, config, min(probe_images, chunk))
  labels = np.asarray(group_labels(num_samples // per_group, per_group, config.model.num_classes))
  key = jax.random.PRNGKey(config.seed + 1)
  shape = (config.model.input_size, config.model.input_size, config.model.in_channels)
  images, masses = [], None
  for i in range(0, len(labels), chunk):
    part = labels[i:i + chunk]
    if len(part) < chunk:  # keep one compiled shape: pad the last chunk
      part = np.concatenate([part, labels[:chunk - len(part)]])
    noise_key, step_key = jax.random.split(jax.random.fold_in(key, i))
    x, mass = cache['sampler'](params, jax.random.normal(noise_key, (chunk,) + shape), jnp.asarray(part), step_key)
    images.append(to_uint8(x)[:min(chunk, len(labels) - i)])
    if i == 0 and mass.size:  # S_cross from the first chunk's first probe_images images
      masses = mass
  s_cross = None
  if masses is not None:
    summary = s_cross_probe.summarize(masses)
    s_cross = {'mean_percent': 100 * float(summary['mean']),
               'per_stage_percent': [100 * float(v) for v in summary['per_stage']],
               'per_layer_percent': [100 * float(v) for v in summary['per_layer']],
               'stages_t': list(STAGES), 'probe_images': int(masses.shape[2] * masses.shape[3])}
  return np.concatenate(images), labels, s_cross


# --- Aggregation -----------------------------------------------------------------

def load_runs(out):
  runs = []
  directory = os.path.join(out, 'runs')
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    if name.endswith('.json'):
      with open(os.path.join(directory, name)) as f:
        runs.append(json.load(f))
  return runs


def mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None, 0
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def aggregate(out, settings):
  """results.json (per setting mean/std over seeds, correlation) and table.md."""
  runs = load_runs(out)
  rows = []
  for name in settings:
    mine = [r for r in runs if r['setting'] == name]
    if not mine:
      continue
    fd, fd_std, n = mean_std([r['fd_toy'] for r in mine])
    acc, acc_std, _ = mean_std([r['class_accuracy'] for r in mine])
    sc, sc_std, _ = mean_std([r['s_cross']['mean_percent'] if r['s_cross'] else None for r in mine])
    rows.append({'setting': name, 'description': DESCRIPTIONS.get(name, name), 'uc': SETTINGS[name][0],
                 'grouping': SETTINGS[name][1], 'timestep_jitter': SETTINGS[name][2], 'seeds': sorted(
                     r['seed'] for r in mine), 'fd_toy_mean': fd, 'fd_toy_std': fd_std,
                 'class_accuracy_mean': acc, 'class_accuracy_std': acc_std, 's_cross_mean': sc,
                 's_cross_std': sc_std, 'num_runs': n,
                 'train_seconds_mean': float(np.mean([r['train_seconds'] for r in mine])),
                 'sample_seconds_mean': float(np.mean([r['sample_seconds'] for r in mine]))})
  # S_cross vs FD over the grouped settings (UC >= 2): Pearson r of the setting means and of the runs.
  grouped = [r for r in rows if r['uc'] > 1 and r['s_cross_mean'] is not None]
  corr = {}
  if len(grouped) >= 3:
    corr['settings'] = float(np.corrcoef([r['s_cross_mean'] for r in grouped], [r['fd_toy_mean'] for r in grouped])[0, 1])
  grouped_runs = [r for r in runs if r['s_cross'] and r['setting'] in settings]
  if len(grouped_runs) >= 3:
    corr['runs'] = float(np.corrcoef([r['s_cross']['mean_percent'] for r in grouped_runs],
                                     [r['fd_toy'] for r in grouped_runs])[0, 1])
  meta_path = os.path.join(out, 'meta.json')
  meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
  result = {'rows': rows, 'correlation_s_cross_fd': corr, 'meta': meta, 'num_runs': len(runs)}
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write(markdown_table(rows))
  return result


def markdown_table(rows):
  fmt = lambda m, s, d=2: '-' if m is None else f'{m:.{d}f} ± {s:.{d}f}'
  lines = ['| setting | UC | grouping | sigma_tv | seeds | FD_toy ↓ | class acc. % ↑ | S_cross % |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['description']} | {r['uc']} | {r['grouping'] or '-'} | "
                 f"{int(round(r['timestep_jitter'] * 1000))} | {len(r['seeds'])} | "
                 f"{fmt(r['fd_toy_mean'], r['fd_toy_std'])} | "
                 f"{fmt(100 * r['class_accuracy_mean'], 100 * r['class_accuracy_std'], 1)} | "
                 f"{fmt(r['s_cross_mean'], r['s_cross_std'])} |")
  return '\n'.join(lines) + '\n'


def write_plots(out, result, prefix='results_'):
  """FD vs group size, and S_cross vs FD (with Pearson r), as PNGs in `out`."""
  from experiments import plots
  rows = {r['setting']: r for r in result['rows']}
  paths = []
  sim = [rows[n] for n in ('baseline', 'sim_uc2', 'sim_uc4', 'sim_uc8') if n in rows]
  if len(sim) >= 2:
    series = [{'label': 'similarity groups', 'x': [float(np.log2(r['uc'])) for r in sim],
               'y': [r['fd_toy_mean'] for r in sim], 'yerr': [r['fd_toy_std'] for r in sim]}]
    for name, label in (('random_uc4', 'random, UC=4'), ('class_uc4', 'class, UC=4'),
                        ('sim_uc4_tv100', 'similarity + sigma_tv, UC=4')):
      if name in rows:
        series.append({'label': label, 'x': [2.0], 'y': [rows[name]['fd_toy_mean']],
                       'yerr': [rows[name]['fd_toy_std']]})
    paths.append(plots.plot(os.path.join(out, f'{prefix}fd_vs_group_size.png'), series,
                            'unconditional group size UC (1 = baseline)', 'FD_toy (lower is better)',
                            'FD_toy vs group size (mean ± std over seeds)',
                            xticks=[(float(np.log2(r['uc'])), str(r['uc'])) for r in sim]))
  grouped = [r for r in result['rows'] if r['s_cross_mean'] is not None]
  if len(grouped) >= 2:
    r_value = result['correlation_s_cross_fd'].get('settings')
    title = 'S_cross vs FD_toy' + (f' (Pearson r = {r_value:.2f} over settings)' if r_value is not None else '')
    series = [{'label': 'grouped settings', 'x': [r['s_cross_mean'] for r in grouped],
               'y': [r['fd_toy_mean'] for r in grouped], 'xerr': [r['s_cross_std'] for r in grouped],
               'yerr': [r['fd_toy_std'] for r in grouped], 'point_labels': [r['setting'] for r in grouped]}]
    paths.append(plots.plot(os.path.join(out, f'{prefix}s_cross_vs_fd.png'), series, 'S_cross (%)',
                            'FD_toy (lower is better)', title, lines=False))
  return paths


# --- Main ------------------------------------------------------------------------

def add_config_flags(parser):
  """Flags that change configs/toy_table1.py or the scoring (shared with experiments/toy_pilot.py)."""
  parser.add_argument('--num_steps', type=int, default=None, help='training steps (default: the config)')
  parser.add_argument('--num_samples', type=int, default=512)
  parser.add_argument('--sample_steps', type=int, default=None, help='sampler steps (multiple of 4)')
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


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='output folder (runs/, results.json, table.md, PNGs)')
  parser.add_argument('--settings', default=','.join(SETTINGS), help='comma-separated names of SETTINGS')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--probe_images', type=int, default=256, help='images probed for S_cross')
  add_config_flags(parser)
  return parser.parse_args(argv)


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
  return config


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  start = time.time()
  os.makedirs(os.path.join(args.out, 'runs'), exist_ok=True)
  settings = [s for s in args.settings.split(',') if s]
  unknown = set(settings) - set(SETTINGS)
  if unknown:
    raise ValueError(f'Unknown settings {sorted(unknown)}; choose from {list(SETTINGS)}.')
  seeds = [int(s) for s in args.seeds.split(',') if s]
  base = base_config(args)
  data = base.data

  # --- Data, feature network, reference statistics ------------------------------
  images, labels, attributes, _ = toy_shapes.load_toy_shapes(data.num_images, data.dataset_seed, data.image_size,
                                                             data.embedding_dims, data.num_neighbors)
  held_images, held_labels, _ = toy_shapes.make_shapes(args.held_out, HELD_OUT_SEED, data.image_size)
  feature_params = toy_features.train_feature_net(images, labels, attributes, args.feature_steps)
  featurize = toy_features.make_featurizer(feature_params)
  reference = fid.FIDStatistics.from_features(featurize(images)[0])
  real = toy_features.evaluate_real(featurize, held_images, held_labels, reference)
  meta = {'evaluator_real_accuracy': real['accuracy'], 'fd_real_held_out': real['fd'],
          'held_out_images': args.held_out, 'held_out_dataset_seed': HELD_OUT_SEED,
          'feature_steps': args.feature_steps,
          'num_images': data.num_images, 'num_samples': args.num_samples, 'seeds': seeds, 'settings': settings,
          'config': base.to_dict(), 'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, '
                                               f'{jax.devices()[0].platform}', 'setup_seconds': time.time() - start}
  with open(os.path.join(args.out, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=2)
  print(f"Evaluator: held-out real accuracy {real['accuracy']:.3f}; FD_toy of {args.held_out} real held-out "
        f"images: {real['fd']:.3f} (setup {meta['setup_seconds']:.0f} s).", flush=True)

  # --- Runs -----------------------------------------------------------------------
  mesh = sharding.make_mesh()
  caches = {name: {} for name in settings}
  for seed in seeds:
    for name in settings:
      path = os.path.join(args.out, 'runs', f'{name}_seed{seed}.json')
      if os.path.exists(path):
        continue
      config = setting_config(base, name, seed, args.num_samples)
      model = caches[name].setdefault('model', model_from_config(config.model))
      tic = time.time()
      state, losses = train_run(config, model, mesh, caches[name])
      train_seconds = time.time() - tic
      tic = time.time()
      samples, sample_labels, s_cross = sample_run(config, model, state.ema_params, caches[name], args.num_samples,
                                                   args.chunk, args.probe_images)
      sample_seconds = time.time() - tic
      scores = toy_features.score_samples(featurize, samples, sample_labels, reference)
      record = {'setting': name, 'seed': seed, 'fd_toy': scores['fd'], 'class_accuracy': scores['class_accuracy'],
                's_cross': s_cross,
                'final_loss': losses[-1], 'losses': losses, 'train_seconds': train_seconds,
                'sample_seconds': sample_seconds, 'num_samples': len(samples),
                'nfe_per_branch': samplers.number_of_function_evaluations(config.sample.num_steps,
                                                                          config.sample.sampler)}
      if seed == seeds[0]:
        per_group = config.sample.images_per_group  # one jointly generated group per row, one class per row
        save_grid(samples[:10 * per_group], per_group, os.path.join(args.out, f'samples_{name}.png'))
      with open(path, 'w') as f:
        json.dump(record, f, indent=2)
      s_cross_text = f"{s_cross['mean_percent']:.2f}%" if s_cross else '-'
      print(f"{name} seed {seed}: FD_toy {record['fd_toy']:.3f}, class acc {record['class_accuracy']:.3f}, S_cross "
            f"{s_cross_text}, loss {losses[-1]:.4f}; train {train_seconds:.0f} s, sample {sample_seconds:.0f} s.",
            flush=True)
      aggregate(args.out, settings)

  result = aggregate(args.out, settings)
  result['meta']['wall_seconds_this_invocation'] = time.time() - start
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2)
  write_plots(args.out, result)
  print(markdown_table(result['rows']))
  print(f'Wall time {time.time() - start:.0f} s. Results: {os.path.abspath(args.out)}')
  return result


if __name__ == '__main__':
  main()
