"""Pilot for the toy Table 1: does the baseline learn, and how fast?

  JAX_PLATFORMS=cpu python -m experiments.toy_pilot --name=default --out=docs/toy_pilot.json

Trains the baseline of experiments/table1.py (setting 'baseline': SiT, no
groups, 20% label dropout) on the toy shapes with configs/toy_table1.py
(changed by the flags) and, every --eval_every steps, samples
--num_samples images from the EMA model and scores them with the toy
feature net (evaluation/toy_features.py): sample class accuracy and FD_toy,
at each guidance scale of --cfg_scales (the curve). The feature net is
trained at the start, or read from --feature_cache where an earlier pilot
left it (with its held-out real accuracy and FD).

The JSON at --out keeps one entry per --name (a rerun of a name replaces
it): the flags, the config, the curve, wall times, and the evaluator's
numbers; the PNGs beside it (<stem>_accuracy.png, <stem>_fd.png) plot every
entry's curve at its best guidance scale, and <stem>_samples_<name>.png is
the last evaluation's grid (one class per row).
"""

import argparse
import json
import logging
import os
import sys
import time


from experiments import plots, table1
from groupdiff_jax import sharding
from groupdiff_jax.data import toy_shapes
from groupdiff_jax.evaluation import toy_features
from groupdiff_jax.models.dit import model_from_config
from groupdiff_jax.sample import save_grid

SETTING = 'baseline'


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='pilot JSON (its PNGs are written beside it)')
  parser.add_argument('--name', required=True, help='this configuration\'s entry in the JSON')
  parser.add_argument('--eval_every', type=int, default=500, help='training steps between evaluations')
  parser.add_argument('--cfg_scales', default=None, help='comma-separated guidance scales (default: --cfg_scale)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--feature_cache', default=None,
                      help='folder caching the trained feature net across pilots, keyed by --feature_steps and '
                      'the dataset size (empty it when toy_shapes.py changes; default: retrain)')
  table1.add_config_flags(parser)  # --num_steps, --variant, --hidden_size, --depth, --sample_steps, ...
  return parser.parse_args(argv)


def load_or_train_evaluator(args, images, labels, attributes, held_images, held_labels, options):
  """(featurize, reference statistics, {'accuracy', 'fd', 'train_seconds', 'steps'}) of the feature net.

  The cache file is named by the feature steps, the dataset size and, away
  from the defaults, the data `options` (toy_shapes.data_options).
  """
  data_tag = ''
  if options['textures'] != toy_shapes.TEXTURES or options['size_range'] != toy_shapes.SIZE_RANGE:
    low, high = options['size_range']
    data_tag = f"_{'-'.join(options['textures'])}_size{low:g}-{high:g}"
  name = f'toy_features_{args.feature_steps}_dataset{args.num_images or len(images)}{data_tag}.msgpack'
  path = os.path.join(args.feature_cache, name) if args.feature_cache else None
  featurize, reference, seconds = toy_features.load_or_train(images, labels, attributes, args.feature_steps, path,
                                                             trained_on=options)
  info = {'steps': args.feature_steps, 'train_seconds': seconds}
  info.update(toy_features.evaluate_real(featurize, held_images, held_labels, reference))
  return featurize, reference, info


def best_scale(curve):
  """The guidance scale with the highest class accuracy at the last evaluated step of `curve`."""
  last = max(p['step'] for p in curve)
  return max((p for p in curve if p['step'] == last), key=lambda p: p['class_accuracy'])['cfg_scale']


def write_plots(out, entries):
  """Accuracy and FD_toy vs training steps, one line per entry (at its best guidance scale)."""
  stem = os.path.splitext(out)[0]
  for key, label, suffix in (('class_accuracy', 'sample class accuracy', 'accuracy'), ('fd', 'FD_toy', 'fd')):
    series = []
    for entry in entries.values():
      scale = best_scale(entry['curve'])
      points = [p for p in entry['curve'] if p['cfg_scale'] == scale]
      series.append({'label': f"{entry['name']} (cfg {scale:g})", 'x': [float(p['step']) for p in points],
                     'y': [p[key] for p in points]})
    plots.plot(f'{stem}_{suffix}.png', series, 'training steps', label,
               f'Toy baseline pilot: {label} of EMA samples vs steps')


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  start = time.time()
  base = table1.base_config(args)
  scales = [float(s) for s in args.cfg_scales.split(',')] if args.cfg_scales else [base.sample.cfg_scale]
  data = base.data
  options = toy_shapes.data_options(data)
  images, labels, attributes, _ = toy_shapes.load_toy_shapes(data.num_images, data.dataset_seed, data.image_size,
                                                             data.embedding_dims, data.num_neighbors, **options)
  held_images, held_labels, _ = toy_shapes.make_shapes(args.held_out, table1.HELD_OUT_SEED, data.image_size,
                                                       **options)
  featurize, reference, evaluator = load_or_train_evaluator(args, images, labels, attributes, held_images,
                                                            held_labels, options)
  print(f"Evaluator: held-out real accuracy {evaluator['accuracy']:.4f}, FD_toy {evaluator['fd']:.3f}.", flush=True)

  configs = {}
  for scale in scales:
    config = table1.setting_config(base, SETTING, args.seed, args.num_samples)
    with config.unlocked():
      config.sample.cfg_scale = scale
    configs[scale] = config
  config = configs[scales[0]]
  model = model_from_config(config.model)
  caches = {scale: {} for scale in scales}  # a sampler per guidance scale (the scale is compiled in)
  curve, eval_seconds, last, train_start = [], [0.0], {}, [time.time()]

  def write_entry(losses=None):
    """This pilot's entry in the JSON (rewritten after every evaluation, so a cut-short pilot is kept)."""
    entries = {}
    if os.path.exists(args.out):
      with open(args.out) as f:
        entries = {e['name']: e for e in json.load(f)['pilots']}
    entries[args.name] = {
        'name': args.name, 'argv': sys.argv[1:] if argv is None else argv, 'finished': losses is not None,
        'cfg_scales': scales, 'curve': curve, 'losses': losses,
        'train_seconds': time.time() - train_start[0] - eval_seconds[0], 'eval_seconds': eval_seconds[0],
        'wall_seconds': time.time() - start, 'cpu_seconds': time.process_time(),  # all threads, whole process
        'num_samples': args.num_samples, 'evaluator': evaluator,
        'model': {k: config.model[k] for k in ('variant', 'depth', 'hidden_size', 'num_heads')},
        'train': {'num_steps': config.train.num_steps, 'batch_size': config.train.batch_size,
                  'lr': config.optim.lr, 'ema_decay': config.optim.ema_decay},
        'sample': {'sampler': config.sample.sampler, 'num_steps': config.sample.num_steps},
        'data': {'textures': list(options['textures']), 'size_range': list(options['size_range'])}}
    with open(args.out, 'w') as f:
      json.dump({'pilots': list(entries.values())}, f, indent=2)
    write_plots(args.out, entries)
    return entries[args.name]

  def evaluate(steps_done, state):
    if steps_done % args.eval_every and steps_done != config.train.num_steps:
      return
    tic = time.time()
    for scale in scales:
      samples, sample_labels, _, _ = table1.sample_run(configs[scale], model, state.ema_params, caches[scale],
                                                       args.num_samples, args.chunk, 0)
      scores = toy_features.score_samples(featurize, samples, sample_labels, reference)
      curve.append({'step': steps_done, 'cfg_scale': scale, **scores})
      last[scale] = samples
      print(f"step {steps_done} cfg {scale:g}: class acc {scores['class_accuracy']:.3f}, FD_toy {scores['fd']:.2f}",
            flush=True)
    eval_seconds[0] += time.time() - tic
    write_entry()

  train_start[0] = time.time()
  _, losses = table1.train_run(config, model, sharding.make_mesh(), caches[scales[0]], on_step=evaluate)
  entry = write_entry(losses)
  per_group = config.sample.images_per_group
  grid_path = f'{os.path.splitext(args.out)[0]}_samples_{args.name}.png'
  save_grid(last[best_scale(curve)][:10 * per_group], per_group, grid_path)
  print(f"{args.name}: train {entry['train_seconds']:.0f} s, evaluations {entry['eval_seconds']:.0f} s, wall "
        f"{entry['wall_seconds']:.0f} s.", flush=True)
  return entry


if __name__ == '__main__':
  main()
