"""The digits demo's samples scored by a digits classifier: which sampling defaults read as ten classes?

  python -m groupdiff_jax.main --config=configs/digits.py --workdir=/tmp/groupdiff_digits
  JAX_PLATFORMS=cpu python -m experiments.digits_score --workdir=/tmp/groupdiff_digits --out=docs/digits_score.json

A scikit-learn SVM (RBF kernel) is fitted on half of scikit-learn's digits,
upsampled to 16x16 exactly as the demo trains on them (data/digits.py) and
quantised to uint8 as samples are; its accuracy on the other half is
reported. Every --settings entry samples the same --num_groups groups of 4
(group g is class g mod 10; the same noise for every setting) from ONE
trained run (the EMA weights of the workdir's newest checkpoint: sampling
settings need no retraining, so they compare at equal training wall time),
and the classifier scores them: accuracy (the predicted digit is the group's
class), the fraction of groups with all 4 members right, the accuracy per
class, and the sampling seconds. The demo's own samples.png, if present, is
scored too (`demo_grid`: the 10 groups of the README's picture).
"""

import argparse
import glob
import json
import os
import time

import jax
import numpy as np
from absl import logging

from configs import digits
from groupdiff_jax import checkpoint, sample
from groupdiff_jax.data.digits import NUM_CLASSES, load_digits
from groupdiff_jax.models.dit import model_from_config

SETTINGS = ('cfg2.0:cfg_scale=2.0,group_stage_fraction=1.0', 'cfg3.0:cfg_scale=3.0,group_stage_fraction=1.0',
            'cfg2.0_stage0.4:cfg_scale=2.0,group_stage_fraction=0.4',
            'cfg3.0_stage0.4:cfg_scale=3.0,group_stage_fraction=0.4', 'cfg4.0_stage0.4:cfg_scale=4.0,'
            'group_stage_fraction=0.4')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a trained digits demo run (configs/digits.py)')
  parser.add_argument('--out', required=True, help='JSON report')
  parser.add_argument('--settings', default=';'.join(SETTINGS),
                      help='";"-separated NAME:field=value,field=value of config.sample (default: %(default)s)')
  parser.add_argument('--num_groups', type=int, default=100, help='groups of 4 per setting (10 per class at 100)')
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args(argv)


def parse_settings(text):
  """'name:a=1,b=x;...' -> {name: {'a': 1.0, 'b': 'x'}} (numbers as floats or ints)."""
  settings = {}
  for entry in filter(None, text.split(';')):
    name, _, fields = entry.partition(':')
    values = {}
    for field in filter(None, fields.split(',')):
      key, _, value = field.partition('=')
      try:
        values[key] = int(value) if value.lstrip('-').isdigit() else float(value)
      except ValueError:
        values[key] = value
    settings[name] = values
  return settings


def to_features(images_uint8):
  """uint8 [B, 16, 16, 1] -> float32 [B, 256] in [0, 1]."""
  return images_uint8.reshape(len(images_uint8), -1).astype(np.float32) / 255.0


def fit_classifier(seed):
  """(classifier, held-out accuracy) of an RBF SVM on half of the digits at 16x16, stratified by class."""
  from sklearn.model_selection import train_test_split
  from sklearn.svm import SVC
  images, labels = load_digits(16)  # [1797, 16, 16, 1] in [-1, 1]
  features = to_features(sample.to_uint8(images))
  x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=0.5, random_state=seed,
                                                      stratify=labels)
  classifier = SVC(gamma='scale', C=10.0).fit(x_train, y_train)
  return classifier, float((classifier.predict(x_test) == y_test).mean())


def score(classifier, images_uint8, labels, images_per_group):
  """Accuracy, all-members-right fraction of groups, accuracy per class of uint8 images [B, H, W, 1]."""
  right = classifier.predict(to_features(images_uint8)) == labels
  per_class = {str(c): float(right[labels == c].mean()) for c in range(NUM_CLASSES) if np.any(labels == c)}
  return {'accuracy': float(right.mean()), 'groups_all_right': float(right.reshape(-1, images_per_group).all(1).mean()),
          'accuracy_per_class': per_class, 'images': int(len(labels))}


def main(argv=None):
  args = parse_args(argv)
  logging.set_verbosity(logging.INFO)
  classifier, held_out = fit_classifier(args.seed)
  logging.info('Classifier held-out accuracy on the real digits at 16x16: %.4f', held_out)
  config = digits.get_config()
  params, step = checkpoint.load_params(args.workdir, config.sample.use_ema)
  model = model_from_config(config.model)
  report = {'workdir': os.path.abspath(args.workdir), 'checkpoint_step': int(step),
            'classifier': 'sklearn SVC(rbf, C=10) on 50% of the digits at 16x16 (uint8)',
            'classifier_held_out_accuracy': held_out, 'num_groups': args.num_groups,
            'machine': f'{os.cpu_count()} CPUs, {jax.default_backend()}', 'settings': {}}
  demo = sorted(glob.glob(os.path.join(args.workdir, 'samples', 'samples_*.npz')))
  if demo:  # the demo's own samples (samples.png's groups), in the evaluator's RGB layout
    with np.load(demo[-1]) as data:
      report['demo_grid'] = score(classifier, data['arr_0'][..., :1], data['labels'], config.sample.images_per_group)
  for name, fields in parse_settings(args.settings).items():
    sample_config = config.sample.copy_and_resolve_references()
    sample_config.update(num_groups=args.num_groups, **fields)
    run = sample.make_sampler(model, sample_config, config.model)
    labels = sample.group_labels(args.num_groups, sample_config.images_per_group, config.model.num_classes)
    rng = jax.random.PRNGKey(args.seed + 1)  # the same noise for every setting
    compiled = run.lower(params, labels, rng).compile()  # the sampling seconds below exclude compiling
    start = time.perf_counter()
    images, nfe = compiled(params, labels, rng)
    images = sample.to_uint8(jax.block_until_ready(images))
    seconds = time.perf_counter() - start
    result = score(classifier, images, np.asarray(labels), sample_config.images_per_group)
    result.update(fields=fields, nfe_per_branch=int(nfe), sample_seconds=round(seconds, 2))
    report['settings'][name] = result
    logging.info('%s: accuracy %.3f, groups all right %.3f (%.1f s)', name, result['accuracy'],
                 result['groups_all_right'], seconds)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=1)
  print(json.dumps({name: (r['accuracy'], r['groups_all_right']) for name, r in report['settings'].items()}))
  return report


if __name__ == '__main__':
  main()
