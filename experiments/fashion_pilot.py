"""Pilot for the Fashion-MNIST study: how fast does the baseline learn on one core?

  nice -n 10 taskset -c 0 python -m experiments.fashion_pilot --out=/work/fashion_sweep2/pilot \
      --num_steps=6000 --save_every=1500
  python -m experiments.fashion_pilot --out=/work/fashion_sweep2/pilot --score --json=docs/fashion_pilot.json \
      --cfg_scales=1.5,3 --num_samples=1000 [--evaluator_from=/work/fashion_sweep]

Training (the default) trains the baseline row of experiments/fashion_settings.py
with configs/fashion_mnist.py (model flags as experiments/fashion_table1.py) and
keeps the EMA params every --save_every steps in --out, with the wall and CPU
seconds at each in <out>/pilot.json (the learning rate is constant, so the
checkpoint at step n is an n-step run). `--score` samples every kept
checkpoint at --cfg_scales (whole trajectory) and scores --num_samples
samples with the study's evaluator (the setup in <out>/.., or an earlier
study folder's with --evaluator_from): class accuracy, FD, precision, recall,
sample CPU seconds; written to --json after each point, with sample grids
in <json without .json>/ (4 per row, one class a row). A rerun scores only
the pairs not yet in --json, so it can follow the training.
"""

import argparse
import json
import os
import time

import flax.serialization
import jax

from experiments import fashion_table1, table1
from experiments.fashion_settings import sampling_config, training_config
from groupdiff_jax import sharding
from groupdiff_jax.evaluation import fashion_classifier as fc
from groupdiff_jax.models.dit import model_from_config
from groupdiff_jax.sample import save_grid


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', required=True)
  p.add_argument('--save_every', type=int, default=1000)
  p.add_argument('--score', action='store_true')
  p.add_argument('--json', default='docs/fashion_pilot.json')
  p.add_argument('--evaluator_from', default='', help='--score with the evaluator of an earlier study folder '
                 '(its meta.json and shared/; default: the study setup in <out>/..)')
  args, rest = p.parse_known_args(argv)
  study = fashion_table1.parse_args(rest + [f'--out={os.path.dirname(os.path.abspath(args.out))}'])
  return args, study


def train(args, study):
  base = fashion_table1.base_config(study)
  config = training_config(base, 'baseline', 0, {})
  model = model_from_config(config.model)
  os.makedirs(args.out, exist_ok=True)
  log = {'config': config.to_dict(), 'checkpoints': []}
  start, cpu = [time.time()], [time.process_time()]

  def on_step(step, state):
    if step % args.save_every and step != config.train.num_steps:
      return
    path = os.path.join(args.out, f'ema_step{step}.msgpack')
    with open(path, 'wb') as f:
      f.write(flax.serialization.to_bytes(jax.device_get(state.ema_params)))
    log['checkpoints'].append({'step': step, 'path': path, 'wall_seconds': time.time() - start[0],
                               'cpu_seconds': time.process_time() - cpu[0]})
    with open(os.path.join(args.out, 'pilot.json'), 'w') as f:
      json.dump(log, f, indent=1)
    print(f'step {step}: {time.time() - start[0]:.0f} s wall, {time.process_time() - cpu[0]:.0f} s CPU', flush=True)

  table1.train_run(config, model, sharding.make_mesh(), {}, on_step=on_step)


def score(args, study):
  with open(os.path.join(args.out, 'pilot.json')) as f:
    log = json.load(f)
  base = fashion_table1.base_config(study)
  train_x, train_y, test_x, test_y = fashion_table1.load_data(study)
  if args.evaluator_from:
    with open(os.path.join(args.evaluator_from, 'meta.json')) as f:
      recorded = json.load(f)['evaluator']
    spec = fc.Spec(widths=tuple(recorded['widths']), features=recorded['features'])
    params = fashion_table1.classifier(os.path.join(args.evaluator_from, 'shared'), 'evaluator', spec,
                                       recorded['epochs'], train_x, train_y)
    scorer = fc.Scorer(fc.make_featurizer(params, spec), test_x, test_y)
  else:
    scorer, _, _ = fashion_table1.setup(study, train_x, train_y, test_x, test_y)
  config = training_config(base, 'baseline', 0, {})
  model = model_from_config(config.model)
  results, caches = [], {}
  if os.path.exists(args.json):  # a rerun scores only the (checkpoint, scale) pairs not yet in --json
    with open(args.json) as f:
      results = [r for r in json.load(f)['results'] if r.get('num_samples') == study.num_samples]
  for checkpoint in log['checkpoints']:
    params = None
    for scale in [float(s) for s in study.cfg_scales.split(',')]:
      if any(r['step'] == checkpoint['step'] and r['cfg_scale'] == scale for r in results):
        continue
      if params is None:
        with open(checkpoint['path'], 'rb') as f:
          params = flax.serialization.msgpack_restore(f.read())
      sample_config = sampling_config(config, 'baseline', study.num_samples, scale, (0.0, 1.0))
      tic, cpu = time.time(), time.process_time()
      samples, labels, _, _ = table1.sample_run(sample_config, model, params, caches.setdefault(scale, {}),
                                                study.num_samples, study.chunk, 0)
      result = {'step': checkpoint['step'], 'cfg_scale': scale, **scorer.score(samples, labels),
                'sample_seconds': time.time() - tic, 'sample_cpu_seconds': time.process_time() - cpu,
                'train_cpu_seconds': checkpoint['cpu_seconds'],
                'train_wall_seconds': checkpoint['wall_seconds']}
      results.append(result)
      print({k: v for k, v in result.items() if k != 'train_wall_seconds'}, flush=True)
      grids = os.path.splitext(args.json)[0]
      os.makedirs(grids, exist_ok=True)
      save_grid(samples[:40], 4, os.path.join(grids, f"step{checkpoint['step']}_cfg{scale:g}.png"))
      write_report(args, study, config, scorer, log, results)
  return write_report(args, study, config, scorer, log, results)


def write_report(args, study, config, scorer, log, results):
  report = {'evaluator_test_accuracy': scorer.test_accuracy, 'evaluator_from': args.evaluator_from or study.out,
            'model': {k: config.model[k] for k in ('variant', 'depth', 'hidden_size', 'num_heads')},
            'train': {'batch_size': config.train.batch_size, 'lr': config.optim.lr},
            'sample': {'sampler': config.sample.sampler, 'num_steps': config.sample.num_steps,
                       'num_samples': study.num_samples, 'interval': 'whole trajectory'},
            'training_log': log['checkpoints'],
            'results': sorted(results, key=lambda r: (r['step'], r['cfg_scale']))}
  with open(args.json, 'w') as f:
    json.dump(report, f, indent=1)
  return report


def main(argv=None):
  args, study = parse_args(argv)
  return score(args, study) if args.score else train(args, study)


if __name__ == '__main__':
  main()
