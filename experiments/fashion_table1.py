"""GroupDiff-l on Fashion-MNIST: Tables 1 and 2 with the paper's protocol (issue 31; docs/results.md).

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false JAX_PLATFORMS=cpu \
      nice -n 10 taskset -c 1 python -m experiments.fashion_table1 --out=/work/fashion_sweep2
  python -m experiments.fashion_table1 --out=/work/fashion_sweep2 --report_only

Setup (once, kept in <out>/shared): the learned encoder (a classifier of
its own), the encoder's and the pixels' PCA embeddings of the training split
and their neighbour lists from the real retrieval job (data/neighbors_job.py;
ScaNN calibrated to recall@K >= 0.96, or --neighbour_method=exact) with each
one's neighbour class purity; then, when the first samples are scored, the
evaluator of record (evaluation/fashion_classifier.py, trained on the
training split), its test accuracy and the test-vs-train FD (the floor).
Each piece is built under a file lock, so `--setup_only` started earlier on
the same --out and the sweep never build one twice.

Runs (seeds outer, rows of experiments/fashion_settings.py inner): train
configs/fashion_mnist.py (changed per row), then sample at every CFG scale
of --cfg_scales over the whole trajectory and inside the official interval
[0.25, 0.75] (CFG 1 once: no guidance), each with --curve_samples images of
GroupDiff-l inference, scored against the 10,000 test images: FD in the
evaluator's feature space, class accuracy, precision and recall (ADM k-NN
manifolds); S_cross on the sampler's trajectory of the unconditional group
branch (--probe_images). The point of lowest curve FD is then sampled
again with --num_samples (5,000) images and new noise: that is the run's
reported FD ('best'), with the curve beside it. The first 1,000 of those
samples go to <runs>/<row>_seed<k>_samples.npz (uint8 images
[1000, 32, 32, 1], labels, the CFG scale and interval).

The long pair (baseline_long, sim_uc4_long: 4x the steps) runs for --long_seeds
only (default seed 0); seeds are the outer loop, so seed 0 of every row
comes first: its baseline run is the sizing check (class accuracy >= 85% at
its best CFG).

Budget, in training-step equivalents of the baseline (batch 32; the pilot,
experiments/fashion_pilot.py, measured ~0.14 CPU-s per step; docs/results.md):
a run samples ~12,500 image-passes x 12 Euler steps (curve: CFG 1 one
branch, 4 whole-trajectory scales two, 4 interval scales ~1.5; the best
point 5,000 images) ~ 3,100 step equivalents. 27 trained runs + the long
pair (2 x 4x) = 35 trainings of num_steps, and 47 sampled runs (27 + 18
Table 2 + 2): at 4,000 steps ~ 286,000 step equivalents ~ 11.1 h of one free
core, plus the setup (the evaluator: 15 epochs).

Resume: a run's training state is saved every --train_checkpoint_every
steps (<runs>/params/<row>_seed<k>_<hash>_state_step<n>.msgpack + .json, the
losses and the group branch's curve so far) and a killed training resumes
from the last one, exactly (batches are a pure function of seed and step);
trained EMA params are kept in <runs>/params; each sampled point is
appended to <runs>/<row>_seed<k>.partial.json as it is scored; a finished
run is <runs>/<row>_seed<k>.json. A rerun with the same arguments skips
finished runs and points (other arguments: an error naming the file).
Processes started side by side on one --out share the work: each run is
claimed by a lock (<runs>/<row>_seed<k>.lock) and a process skips the runs
another holds (it says so; run it again later to pick up any it skipped);
a sampling-only row waits for its model's training in another process and
loads it; <out>/invocations.json keeps every process's entry.
`--report_only` writes --json (default docs/fashion_table1.json), the
table <docs_dir>/table.md, plots, grids and the samples into --docs_dir
from whatever runs have finished, marked partial until all have.
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
import numpy as np

from configs import fashion_mnist as fashion_config
from experiments import fashion_report, table1
from experiments.fashion_settings import DEFAULT_SETTINGS, SETTINGS, check_settings, sampling_config, training_config
from experiments.sweep_files import claim, exclusive, merge_invocation
from groupdiff_jax import errors, sharding
from groupdiff_jax.data import fashion_mnist, neighbors_job, retrieval
from groupdiff_jax.data.array_batches import pca_embeddings
from groupdiff_jax.evaluation import fashion_classifier as fc
from groupdiff_jax.evaluation import fid, group_branch_probe
from groupdiff_jax.models.dit import model_from_config

INTERVALS = {'all': (0.0, 1.0), 'official': (0.25, 0.75)}  # SiT GroupDiff-l-4's released setting: [0.25, 0.75]
PURITY_K = (3, 10)
PROBE_GROUPS = 32  # held-out groups of 4 per kind for the group branch's learning curve
PROBE_CHECKPOINTS = 4  # evaluations through training (at 1/4, 2/4, 3/4, 4/4 of the steps)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', default='/work/fashion_sweep', help='runs, shared setup, logs (outside the repository)')
  p.add_argument('--runs', default=None, help='default <out>/runs')
  p.add_argument('--json', default='docs/fashion_table1.json')
  p.add_argument('--docs_dir', default='docs/fashion_table1', help='--report_only: plots, table, samples')
  p.add_argument('--settings', default=','.join(DEFAULT_SETTINGS))
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--long_seeds', default='0', help='seeds of the long pair (table 4 rows)')
  p.add_argument('--cfg_scales', default='1,1.5,2,3,4')
  p.add_argument('--curve_samples', type=int, default=1000, help='samples per point of the CFG curve')
  p.add_argument('--num_samples', type=int, default=5000, help='samples of the best point (the reported FD)')
  p.add_argument('--chunk', type=int, default=500, help='images per sampler call')
  p.add_argument('--saved_samples', type=int, default=1000, help='samples of the best point kept per run (npz)')
  p.add_argument('--probe_images', type=int, default=64, help='images probed for S_cross (whole groups)')
  p.add_argument('--num_steps', type=int, default=None, help='training steps (default: the config\'s)')
  p.add_argument('--depth', type=int, default=None)
  p.add_argument('--hidden_size', type=int, default=None)
  p.add_argument('--batch_size', type=int, default=None)
  p.add_argument('--sample_steps', type=int, default=None)
  p.add_argument('--log_every', type=int, default=None, help='steps per logged loss (default: the config\'s)')
  p.add_argument('--data_dir', default='', help='Fashion-MNIST IDX folder (default: the Debian package\'s)')
  p.add_argument('--classifier_epochs', type=int, default=15)
  p.add_argument('--encoder_epochs', type=int, default=2)
  p.add_argument('--num_neighbors', type=int, default=32, help='K of the neighbour job')
  p.add_argument('--neighbour_method', default='scann', choices=('scann', 'exact'),
                 help='the neighbour job\'s --method (scann: calibrated to recall@K >= 0.96; exact: brute force)')
  p.add_argument('--train_checkpoint_every', type=int, default=1000,
                 help='steps between saved training states (a killed run resumes from the last; multiple of 100)')
  p.add_argument('--setup_only', action='store_true', help='the shared setup (classifiers, neighbours) only')
  p.add_argument('--report_only', action='store_true', help='write the report from finished runs; run nothing')
  args = p.parse_args(argv)
  args.runs = args.runs or os.path.join(args.out, 'runs')
  return args


def base_config(args):
  config = fashion_config.get_config()
  with config.unlocked():
    for value, section, key in ((args.num_steps, 'train', 'num_steps'), (args.depth, 'model', 'depth'),
                                (args.hidden_size, 'model', 'hidden_size'), (args.batch_size, 'train', 'batch_size'),
                                (args.sample_steps, 'sample', 'num_steps'), (args.log_every, 'train', 'log_every')):
      if value is not None:
        config[section][key] = value
    config.data.data_dir = args.data_dir
  return config


def say(message):
  """One line of the sweep's log, with the UTC time (the log is how its wall time is read)."""
  print(f"{datetime.datetime.now(datetime.timezone.utc).strftime('%H:%M:%S')} {message}", flush=True)


def digest(value):
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json(path, value):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


# --- Setup: evaluator, encoder, neighbours -------------------------------------------------------------
def load_data(args):
  train_x, train_y = fashion_mnist.load_split(args.data_dir, 'train', 32)
  test_x, test_y = fashion_mnist.load_split(args.data_dir, 'test', 32)
  return train_x, train_y, test_x, test_y


def record_invocation(log_path, invocation):
  """Writes this invocation's entry into <out>/invocations.json, re-read under its lock."""
  with exclusive(log_path):
    write_json(log_path, merge_invocation(read_json(log_path, []), invocation))


def classifier(shared, name, spec, epochs, train_x, train_y, monitor=None):
  path = os.path.join(shared, f'{name}_{digest([spec.__dict__, epochs, len(train_x)])}.msgpack')
  with exclusive(path):
    if os.path.exists(path):
      with open(path, 'rb') as f:
        return flax.serialization.msgpack_restore(f.read())
    tic = time.time()
    params = fc.train_classifier(train_x, train_y, spec, epochs, log=say, monitor=monitor)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(flax.serialization.to_bytes(jax.device_get(params)))
    os.replace(tmp, path)
    say(f'{name}: {epochs} epochs in {time.time() - tic:.0f} s -> {path}')
  return params


def neighbour_lists(shared, name, embeddings, labels, k, method):
  """Through the neighbour job: <shared>/neighbors_<name>_<hash>; returns (dir, purity at PURITY_K, job meta)."""
  tag = f'{name}_{digest([embeddings.shape, float(np.abs(embeddings).sum()), k, method])}'
  emb_dir, out_dir = os.path.join(shared, f'embeddings_{tag}'), os.path.join(shared, f'neighbors_{tag}')
  with exclusive(out_dir):
    if not os.path.exists(os.path.join(out_dir, 'neighbors.npy')):
      os.makedirs(emb_dir, exist_ok=True)
      np.save(os.path.join(emb_dir, 'embeddings.npy'), retrieval.l2_normalize(embeddings.astype(np.float32)))
      write_json(os.path.join(emb_dir, 'meta.json'), {'encoder': name, 'D': int(embeddings.shape[1])})
      neighbors_job.run(emb_dir, out_dir, k=k, method=method, overwrite=True)
  neighbors = np.load(os.path.join(out_dir, 'neighbors.npy'))
  purity = {str(n): float((labels[neighbors[:, :n]] == labels[:, None]).mean()) for n in PURITY_K}
  job = read_json(os.path.join(out_dir, 'meta.json'), {})
  return out_dir, purity, {'method': job.get('method'), 'recall': job.get('recall'),
                           'recall_queries': job.get('recall_queries'), 'index': job.get('index')}


class LazyScorer:
  """The evaluator's Scorer, built (trained or loaded) when first used: the first run trains meanwhile."""

  def __init__(self, build):
    self._build, self._scorer = build, None

  def __getattr__(self, name):
    if self._scorer is None:
      self._scorer = self._build()
    return getattr(self._scorer, name)


def setup(args, train_x, train_y, test_x, test_y):
  """(LazyScorer, {'encoder': dir, 'pca': dir}, probe images per grouping kind); writes <out>/meta.json."""
  shared = os.path.join(args.out, 'shared')
  os.makedirs(shared, exist_ok=True)
  meta_path = os.path.join(args.out, 'meta.json')
  tic = time.time()
  encoder = classifier(shared, 'encoder', fc.ENCODER, args.encoder_epochs, train_x, train_y)
  encode = fc.make_featurizer(encoder, fc.ENCODER)
  enc_feats, _ = encode(train_x)
  encoder_dir, encoder_purity, encoder_job = neighbour_lists(shared, 'encoder', enc_feats, train_y,
                                                             args.num_neighbors, args.neighbour_method)
  pca_dir, pca_purity, pca_job = neighbour_lists(shared, 'pixel_pca', pca_embeddings(train_x, 32, np.float32),
                                                 train_y, args.num_neighbors, args.neighbour_method)
  meta = {**read_json(meta_path, {}),
          'encoder': {'kind': 'a classifier of its own (other widths and seed, no weights shared with the '
                              'evaluator), L2-normalised penultimate features',
                      'widths': list(fc.ENCODER.widths), 'features': fc.ENCODER.features,
                      'epochs': args.encoder_epochs},
          'neighbour_purity': {'encoder': encoder_purity, 'pixel_pca': pca_purity},
          'neighbour_job': {'encoder': encoder_job, 'pixel_pca': pca_job},
          'neighbour_dirs': {'encoder': encoder_dir, 'pca': pca_dir},
          'train_images': len(train_x), 'test_images': len(test_x),
          'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}'}
  write_json(meta_path, meta)
  say(f"Neighbour purity encoder {encoder_purity} (recall@{args.num_neighbors} {encoder_job['recall']}), pixel PCA "
      f"{pca_purity} (recall {pca_job['recall']}); {args.neighbour_method}.")

  def build_scorer():
    start = time.time()
    evaluator = classifier(shared, 'evaluator', fc.EVALUATOR, args.classifier_epochs, train_x, train_y,
                           monitor=(test_x, test_y))
    featurize = fc.make_featurizer(evaluator, fc.EVALUATOR)
    scorer = fc.Scorer(featurize, test_x, test_y)
    train_feats, _ = featurize(fc.uint8_to_model(fc.quantize(train_x)))
    floor = scorer.reference.fid(fid.FIDStatistics.from_features(train_feats))
    meta.update({'evaluator_test_accuracy': scorer.test_accuracy, 'fd_test_vs_train': floor,
                 'evaluator': {'widths': list(fc.EVALUATOR.widths), 'features': fc.EVALUATOR.features,
                               'epochs': args.classifier_epochs,
                               'augmentation': 'random horizontal flips, 2-px shifts'},
                 'setup_seconds': time.time() - start + setup_seconds})
    write_json(meta_path, {**read_json(meta_path, {}), **meta})
    say(f'Evaluator test accuracy {scorer.test_accuracy:.4f}, FD test vs train {floor:.3f}.')
    return scorer

  groups = group_branch_probe.probe_groups(test_y, encode(test_x)[0], min(PROBE_GROUPS, len(test_x) // 8), 4)
  probe = {kind: test_x[rows] for kind, rows in groups.items()}
  setup_seconds = time.time() - tic
  return LazyScorer(build_scorer), {'encoder': encoder_dir, 'pca': pca_dir}, probe


# --- Runs ----------------------------------------------------------------------------------------------
def sample_points(args):
  """(interval name, cfg scale) of the curve; CFG 1 once (no guidance: the interval does not matter)."""
  scales = [float(s) for s in args.cfg_scales.split(',') if s]
  return [('all', s) for s in scales] + [('official', s) for s in scales if s != 1.0]


def sample_point(args, train_config, name, params, interval, scale, num_samples, caches, probe_images, scorer,
                 seed_offset=0):
  """(scored point, uint8 samples, labels) of one (interval, CFG scale); seed_offset > 0 draws other noise."""
  config = sampling_config(train_config, name, num_samples, scale, INTERVALS[interval])
  if seed_offset:
    with config.unlocked():
      config.seed = train_config.seed + 1000 * seed_offset
  tic = time.time()
  cache = caches.setdefault(('sample', name, interval, scale), {})  # the compiled shape is --chunk's
  model = cache.setdefault('model', model_from_config(config.model))
  samples, labels, trajectory, _ = table1.sample_run(config, model, params, cache, num_samples, args.chunk,
                                                     probe_images)
  point = {'interval': interval, 'cfg_scale': scale, **scorer.score(samples, labels),
           'sample_seconds': time.time() - tic, 's_cross': trajectory}
  return point, samples, labels


def train_or_load(args, train_config, name, seed, model, params_path, partial, partial_path, probe, mesh, caches):
  """The EMA params at params_path, trained first where they are not there yet (resuming a killed training).

  A training writes its losses, the group branch's learning curve and its time into `partial` (the run that
  trained it).
  """
  if os.path.exists(params_path):
    with open(params_path, 'rb') as f:
      return flax.serialization.msgpack_restore(f.read())
  source = SETTINGS[name].trained_from or name
  tic = time.time()
  curve = []
  steps = train_config.train.num_steps
  every = max(1, steps // PROBE_CHECKPOINTS)
  state_prefix = params_path[:-len('.msgpack')] + '_state_step'
  trained_before = [0.0]

  def on_step(step, state):  # the learning curve of the unconditional group branch (UC = 4 rows)
    if train_config.train.group_size == 4 and (step % every == 0 or step == steps):
      rng = jax.random.PRNGKey(seed)
      curve.append({'step': step, **{kind: group_branch_probe.velocity_errors(
          model, state.ema_params, images, 4, train_config.model.num_classes, train_config.model.max_group_size,
          rng) for kind, images in probe.items()}})

  def saved_steps():
    folder, stem = os.path.split(state_prefix)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n[len(stem):-len('.json')]) for n in names if n.startswith(stem) and n.endswith('.json')
                  and os.path.exists(os.path.join(folder, n[:-len('.json')] + '.msgpack')))

  def save(state, losses):  # the training state (+ its log) every --train_checkpoint_every steps
    step = int(jax.device_get(state.step))
    os.makedirs(os.path.dirname(state_prefix), exist_ok=True)
    with open(f'{state_prefix}{step}.msgpack.tmp', 'wb') as f:
      f.write(flax.serialization.to_bytes(jax.device_get(state)))
    os.replace(f'{state_prefix}{step}.msgpack.tmp', f'{state_prefix}{step}.msgpack')
    write_json(f'{state_prefix}{step}.json', {'losses': losses, 'group_branch_curve': curve,
                                              'train_seconds': trained_before[0] + time.time() - tic})
    for old in saved_steps()[:-1]:
      os.remove(f'{state_prefix}{old}.json')
      os.remove(f'{state_prefix}{old}.msgpack')

  def restore(template):
    found = saved_steps()
    if not found:
      return None
    with open(f'{state_prefix}{found[-1]}.msgpack', 'rb') as f:
      state = flax.serialization.from_bytes(template, f.read())
    log = read_json(f'{state_prefix}{found[-1]}.json', {})
    curve.extend(log['group_branch_curve'])
    trained_before[0] = log['train_seconds']
    say(f'{name} seed {seed}: resuming training at step {found[-1]} of {steps}.')
    return state, log['losses']

  state, losses = table1.train_run(train_config, model, mesh, caches.setdefault(('train', source), {}), on_step,
                                   restore=restore, save=save, save_every=args.train_checkpoint_every)
  params = jax.device_get(state.ema_params)
  os.makedirs(os.path.dirname(params_path), exist_ok=True)
  with open(params_path + '.tmp', 'wb') as f:
    f.write(flax.serialization.to_bytes(params))
  os.replace(params_path + '.tmp', params_path)
  train_seconds = trained_before[0] + time.time() - tic
  partial.update(losses=losses, train_seconds=train_seconds, group_branch_curve=curve)
  write_json(partial_path, partial)
  for old in saved_steps():
    os.remove(f'{state_prefix}{old}.json')
    os.remove(f'{state_prefix}{old}.msgpack')
  say(f'{name} seed {seed}: trained {train_config.train.num_steps} steps in {train_seconds:.0f} s, final loss '
      f'{losses[-1]:.4f}.')
  return params


def run_one(args, base, name, seed, neighbour_dirs, scorer, probe, mesh, caches):
  setting = SETTINGS[name]
  train_config = training_config(base, name, seed, neighbour_dirs)
  points = sample_points(args)
  run_hash = digest({'train': train_config.to_dict(), 'name': name, 'points': points, 'n': args.num_samples,
                     'curve_n': args.curve_samples,
                     'sample': base.sample.to_dict()})
  final = os.path.join(args.runs, f'{name}_seed{seed}.json')
  if os.path.exists(final):
    found = read_json(final, {}).get('run_hash')
    if found != run_hash:
      raise errors.UserError(f'{final} holds a run of other arguments (run_hash {found}, now {run_hash}): resume with '
                             'the arguments it was started with, or pass another --runs (or delete the file).')
    return None
  partial_path = os.path.join(args.runs, f'{name}_seed{seed}.partial.json')
  partial = read_json(partial_path, {})
  if partial and partial.get('run_hash') != run_hash:
    raise errors.UserError(f'{partial_path} was started with other arguments; delete it or resume with those.')
  partial = partial or {'run_hash': run_hash, 'curve': [], 'losses': None, 'train_seconds': 0.0}
  source = setting.trained_from or name
  params_path = os.path.join(args.runs, 'params', f'{source}_seed{seed}_{digest(train_config.to_dict())}.msgpack')
  model = model_from_config(train_config.model)
  # a sampling-only row of this seed in another process waits for the training, then loads
  with exclusive(os.path.join(args.runs, f'{source}_seed{seed}_training')):
    params = train_or_load(args, train_config, name, seed, model, params_path, partial, partial_path, probe, mesh,
                           caches)
  done = {(p['interval'], p['cfg_scale']) for p in partial['curve']}
  for interval, scale in points:
    if (interval, scale) in done:
      continue
    point = sample_point(args, train_config, name, params, interval, scale, args.curve_samples, caches,
                         args.probe_images if setting.group_size > 1 else 0, scorer)[0]
    partial['curve'].append(point)
    write_json(partial_path, partial)
    say(f"{name} seed {seed} {interval} CFG {scale:g}: FD {point['fd']:.3f}, class acc "
        f"{point['class_accuracy']:.3f}, precision {point['precision']:.3f}, recall {point['recall']:.3f} "
        f"({point['sample_seconds']:.0f} s, {args.curve_samples} samples).")
  chosen = min(partial['curve'], key=lambda p: p['fd'])
  best, samples, labels = sample_point(args, train_config, name, params, chosen['interval'], chosen['cfg_scale'],
                                       args.num_samples, caches, 0, scorer, seed_offset=1)
  samples_path = os.path.join(args.runs, f'{name}_seed{seed}_samples.npz')
  np.savez_compressed(samples_path, images=samples[:args.saved_samples],
                      labels=labels[:args.saved_samples].astype(np.int32), cfg_scale=best['cfg_scale'],
                      interval=np.asarray(INTERVALS[best['interval']]))
  say(f"{name} seed {seed}: best {best['interval']} CFG {best['cfg_scale']:g}, FD {best['fd']:.3f} "
      f"({args.num_samples} samples), class acc {best['class_accuracy']:.3f}.")
  record = {'setting': name, 'seed': seed, **partial,
            'best': {k: v for k, v in best.items() if k != 's_cross'}, 's_cross_at_best': chosen.get('s_cross'),
            'num_steps': train_config.train.num_steps, 'samples_npz': os.path.basename(samples_path),
            'finished_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  write_json(final, record)
  os.remove(partial_path)
  return record


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  if args.report_only:
    return fashion_report.write(args)
  start = time.time()
  os.makedirs(args.runs, exist_ok=True)
  settings = check_settings([s for s in args.settings.split(',') if s])
  seeds = [int(s) for s in args.seeds.split(',') if s]
  base = base_config(args)
  train_x, train_y, test_x, test_y = load_data(args)
  scorer, neighbour_dirs, probe = setup(args, train_x, train_y, test_x, test_y)
  if args.setup_only:
    return {'evaluator_test_accuracy': scorer.test_accuracy, 'setup_seconds': time.time() - start}
  log_path = os.path.join(args.out, 'invocations.json')
  invocation = {'id': uuid.uuid4().hex,
                'command': 'python -m experiments.fashion_table1 ' + shlex.join(sys.argv[1:] if argv is None else argv),
                'started_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                'wall_seconds': 0.0, 'runs': [], 'skipped_busy': []}
  record_invocation(log_path, invocation)
  mesh, caches = sharding.make_mesh(), {}
  long_seeds = {int(s) for s in args.long_seeds.split(',') if s}
  for seed in seeds:
    for name in settings:
      if SETTINGS[name].table == 4 and seed not in long_seeds:
        continue
      run = f'{name}_seed{seed}'
      with claim(os.path.join(args.runs, run)) as ours:
        record = run_one(args, base, name, seed, neighbour_dirs, scorer, probe, mesh, caches) if ours else None
      if not ours:
        say(f'{name} seed {seed}: another process on {args.out} is running it; skipped here.')
        invocation['skipped_busy'].append(run)
      elif record is not None:
        invocation['runs'].append(run)
      else:
        continue  # finished by an earlier invocation: nothing new to log
      invocation['wall_seconds'] = time.time() - start
      record_invocation(log_path, invocation)
  say(f'Wall time {time.time() - start:.0f} s.' + (
      f" Skipped, another process had them: {', '.join(invocation['skipped_busy'])}; run again once it has "
      'finished.' if invocation['skipped_busy'] else ''))
  return invocation


if __name__ == '__main__':
  main()
