"""The toy sweep's report (experiments/table1_report.py) and figures from hand-made run records."""

import json
import os

import numpy as np
import pytest

from experiments import plots, table1_report
from groupdiff_jax.evaluation import s_cross

STAGES = (0.0, 0.5)
SETTINGS = ['baseline', 'sim_uc2', 'sim_uc4', 'random_uc4']


def trajectory(focus):
  """A trajectory report of one group of 3, two probed steps, one layer: member 0 gives 0.5 + focus of its mass on
  the others to member 1 (its max share - mean share = focus), members 1 and 2 split evenly."""
  share = 0.5 + focus
  mass = np.asarray([[0.4, 0.6 * share, 0.6 * (1 - share)], [0.3, 0.4, 0.3], [0.3, 0.3, 0.4]], np.float32)
  record = {'steps_t': [0.0, 0.5], 'probed': [True, True], 'layers': [0],
            'masses': np.stack([mass, mass])[:, None, None]}  # [steps, layers, G, N, N]
  return s_cross.trajectory_report(record, STAGES, 3)


def run(setting, seed, fd, accuracy, focus=None):
  return {'setting': setting, 'seed': seed, 'fd': fd, 'class_accuracy': accuracy,
          's_cross': None if focus is None else trajectory(focus), 's_cross_renoised': None, 'group_layers': None,
          'train_seconds': 10.0, 'sample_seconds': 2.0}


def sweep_runs():
  runs = []
  for seed in range(3):
    runs += [run('baseline', seed, 10.0 + seed, 0.5), run('sim_uc2', seed, 8.0 + seed + 0.1 * seed ** 2, 0.6, 0.0),
             run('sim_uc4', seed, 6.0 + seed, 0.7, 0.3), run('random_uc4', seed, 9.0 + seed - 0.2 * seed, 0.55, 0.1)]
  return runs


def test_rows_comparisons_and_correlation_from_runs():
  meta = {'evaluator_real_accuracy': 0.97, 'machine': 'test', 'fd_real_held_out': 0.1}  # as table1.main writes
  invocations = [{'command': 'python -m experiments.table1 --out=x', 'wall_seconds': 30.0},
                 {'command': 'python -m experiments.table1 --out=x', 'wall_seconds': 12.0}]
  report = table1_report.build_report(sweep_runs(), meta, invocations, SETTINGS)
  assert report['evaluator_real_accuracy'] == 0.97 and report['fd_real_held_out'] == 0.1
  assert report['wall_seconds'] == 42.0 and report['num_runs'] == 12
  assert report['run_seconds'] == 12 * 12.0
  rows = {r['name']: r for r in report['settings']}
  assert rows['sim_uc4']['fd'] == pytest.approx(7.0) and rows['sim_uc4']['fd_sd'] == pytest.approx(1.0)
  assert rows['sim_uc4']['fd_per_seed'] == {'0': 6.0, '1': 7.0, '2': 8.0} and rows['sim_uc4']['seeds'] == [0, 1, 2]
  assert rows['baseline']['s_cross'] is None and rows['baseline']['grouping'] == 'none'
  assert rows['sim_uc4']['s_cross'] == pytest.approx(10.0, rel=1e-5)  # focus 0.3 for 1 of 3 members
  assert rows['sim_uc4']['s_cross_per_stage'] == {'0': pytest.approx(10.0, rel=1e-5),
                                                   '0.5': pytest.approx(10.0, rel=1e-5)}
  assert rows['sim_uc4']['self_mass_fraction'] == pytest.approx(0.4)
  assert sum(rows['sim_uc4']['share_histogram']['counts']) == 3 * 2 * 3 * 2  # seeds x steps x members x others
  by_name = {c['name']: c for c in report['comparisons']}
  assert set(by_name) == {'similarity vs random (UC=4)', 'similarity UC=4 vs baseline', 'UC growth 2 -> 4'}
  vs_baseline = by_name['similarity UC=4 vs baseline']
  assert vs_baseline['differences'] == [-4.0, -4.0, -4.0] and vs_baseline['verdict'] == 'reproduced'
  assert vs_baseline['class_accuracy']['verdict'] == 'reproduced'  # 0.7 vs 0.5: higher, as the paper's direction
  assert by_name['similarity vs random (UC=4)']['verdict'] == 'reproduced'  # d = -3.0, -2.8, -2.6
  # S_cross beside FD, in the paper's direction: it has random above similarity (23.17 vs 19.95%), UC 4 above 2.
  assert by_name['similarity vs random (UC=4)']['s_cross']['verdict'] == 'not reproduced'  # here 10% vs 3.3%
  assert by_name['UC growth 2 -> 4']['s_cross']['verdict'] == 'reproduced'  # 10% vs 0%
  assert vs_baseline['s_cross'] is None  # the baseline has no S_cross
  corr = report['correlation_s_cross_fd']
  assert corr['settings']['n'] == 3 and corr['settings']['names'] == ['sim_uc2', 'sim_uc4', 'random_uc4']
  assert corr['runs']['n'] == 9 and corr['settings']['r'] < 0  # more focus, lower FD in these numbers
  json.dumps(report)  # JSON-ready
  table = table1_report.markdown_table(report)
  assert sum(line.startswith('|') for line in table.splitlines()) == 2 + 4  # header, rule, 4 rows
  assert table.count('reproduced.') == 3  # one sentence per comparison


def test_figures_are_written_for_the_rows_that_have_data(tmp_path):
  report = table1_report.build_report(sweep_runs(), {}, [], SETTINGS)
  paths = plots.table1_figures(report, str(tmp_path))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ['table1_fd_vs_group_size.png', 'table1_s_cross_per_layer.png', 'table1_s_cross_per_stage.png',
                   'table1_s_cross_vs_fd.png', 'table1_share_histogram.png']  # no Table 2 or diagnostic rows: no bars
  for path in paths:
    assert os.path.getsize(path) > 0


def test_write_json_replaces_the_file_whole(tmp_path):
  path = str(tmp_path / 'r.json')
  table1_report.write_json(path, {'a': 1})
  table1_report.write_json(path, {'b': 2})
  with open(path) as f:
    assert json.load(f) == {'b': 2}
  assert os.listdir(tmp_path) == ['r.json']


def test_diagnostic_bars_once_a_diagnostic_row_has_data(tmp_path):
  runs = sweep_runs() + [run('baseline_cfg1', seed, 5.0 + seed, 0.8) for seed in range(3)]
  report = table1_report.build_report(runs, {}, [], SETTINGS + ['baseline_cfg1'])
  names = {os.path.basename(p) for p in plots.table1_figures(report, str(tmp_path))}
  assert {'table1_diagnostics_fd.png', 'table1_diagnostics_class_accuracy.png'} <= names
