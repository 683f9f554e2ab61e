"""The Fashion-MNIST study's report (experiments/fashion_report.py) built from hand-written run records."""

import json
import types

import numpy as np

from experiments import fashion_report


def _record(setting, seed, fd, s_cross):
  best = {'interval': 'official', 'cfg_scale': 3.0, 'fd': fd, 'class_accuracy': 0.7, 'precision': 0.7,
          'recall': 0.4}
  at_best = None if s_cross is None else {'mean_percent': s_cross, 'per_stage_percent': {'0.25': s_cross},
                                          'per_layer_percent': {'0': s_cross}}
  return {'setting': setting, 'seed': seed, 'best': best, 's_cross_at_best': at_best,
          'curve': [{'interval': 'official', 'cfg_scale': 3.0, 'fd': fd}]}


def test_s_cross_correlation_leaves_out_groups_of_two(tmp_path):
  # S_cross is 0 by definition for two images; an extreme UC = 2 point would dominate r if it were counted.
  rows = {'baseline': (100.0, None), 'sim_uc2': (400.0, 0.0), 'sim_uc4': (150.0, 1.9), 'sim_uc8': (190.0, 1.4),
          'random_uc4': (125.0, 1.8), 'class_uc4': (138.0, 2.0)}
  runs = tmp_path / 'runs'
  runs.mkdir()
  for name, (fd, s_cross) in rows.items():
    (runs / f'{name}_seed0.json').write_text(json.dumps(_record(name, 0, fd, s_cross)))
  args = types.SimpleNamespace(out=str(tmp_path), runs=str(runs), seeds='0', long_seeds='0',
                               settings=','.join(rows))
  report = fashion_report.build(args)
  corr = report['correlation_s_cross_fd']
  kept = ['sim_uc4', 'sim_uc8', 'random_uc4', 'class_uc4']
  assert sorted(corr['names']) == sorted(kept) and corr['n'] == 4
  s_cross, fd = np.array([rows[n][1] for n in kept]), np.array([rows[n][0] for n in kept])
  expected = np.sum((s_cross - s_cross.mean()) * (fd - fd.mean())) / np.sqrt(
      np.sum((s_cross - s_cross.mean())**2) * np.sum((fd - fd.mean())**2))
  # r from four values near 1e2 in float64: a few ulps of rounding
  assert abs(corr['r'] - expected) <= 16 * np.finfo(np.float64).eps
  assert 'more than two' in fashion_report.markdown(report)
