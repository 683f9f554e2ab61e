"""The baseline pilot (experiments/toy_pilot.py) end to end at a tiny size."""

import json
import math
import os

from experiments import toy_pilot

TINY = ['--num_images=300', '--num_steps=4', '--eval_every=2', '--hidden_size=32', '--depth=1', '--batch_size=8',
        '--feature_steps=2', '--held_out=32', '--num_samples=16', '--chunk=16', '--sample_steps=4']


def test_pilot_writes_a_curve_per_guidance_scale_and_keeps_other_entries(tmp_path):
  out = str(tmp_path / 'pilot.json')
  cache = str(tmp_path / 'cache')
  toy_pilot.main([f'--out={out}', '--name=first', '--cfg_scales=1.5,3', f'--feature_cache={cache}'] + TINY)
  entry = toy_pilot.main([f'--out={out}', '--name=second', f'--feature_cache={cache}'] + TINY)
  with open(out) as f:
    entries = {e['name']: e for e in json.load(f)['pilots']}
  assert list(entries) == ['first', 'second'] and entries['second'] == entry
  first = entries['first']
  assert first['finished'] and [(p['step'], p['cfg_scale']) for p in first['curve']] == [
      (2, 1.5), (2, 3.0), (4, 1.5), (4, 3.0)]
  for point in first['curve'] + entry['curve']:
    assert math.isfinite(point['fd']) and point['fd'] >= 0 and 0 <= point['class_accuracy'] <= 1
  assert entry['evaluator'] == first['evaluator']  # the second pilot read the cached feature net
  # The same seed trains the same model whatever scales are evaluated on the way (evaluation draws none of the
  # training's randomness), and a scale's samples (its own noise) do not depend on the other scales: the second
  # pilot, at the config's scale 3 only, repeats the first one's losses and its scale-3 points exactly.
  assert toy_pilot.table1.base_config(toy_pilot.parse_args(['--out=x', '--name=x'])).sample.cfg_scale == 3.0
  assert entry['losses'] and entry['losses'] == first['losses']
  assert entry['curve'] == [p for p in first['curve'] if p['cfg_scale'] == 3.0]
  for name in ('pilot_accuracy.png', 'pilot_fd.png', 'pilot_samples_first.png', 'pilot_samples_second.png'):
    assert os.path.exists(tmp_path / name), name
