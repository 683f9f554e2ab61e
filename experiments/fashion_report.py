"""The Fashion-MNIST study's report from whatever runs have finished (experiments/fashion_table1.py --report_only).

Writes --json (docs/fashion_table1.json): the evaluator's test accuracy and
the test-vs-train FD floor, the encoders' neighbour purities, per row and
seed the FD at every point of the CFG curve, the best FD and its class
accuracy, precision, recall and S_cross, the paired comparisons (95%
t-interval over seeds and a verdict: experiments/table1_stats.py), the
Pearson r of S_cross and FD over the rows with groups of more than two
(S_cross is 0 by definition for two), and the invocations'
wall time. 'status' is 'partial' until every (row, seed) the sweep's
arguments ask for has finished: 'missing_runs' lists the others and
'in_progress' the curve points of runs still sampling (never used in a
comparison). Beside it --docs_dir gets table.md (headed PARTIAL while
partial), the plots (FD vs CFG per row, FD vs group size, Table 2 bars,
S_cross vs FD, the group branch's learning curve), a sample grid per row
(grids/<row>.png: its first finished seed, each row of 4 one class) and a
copy of every finished run's samples npz.
"""

import json
import os
import shutil

import numpy as np

from experiments import plots, table1_stats
from experiments.fashion_settings import COMPARISONS, SETTINGS
from groupdiff_jax.sample import save_grid


def _read(path, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def load_runs(runs_dir):
  names = sorted(n for n in os.listdir(runs_dir) if n.endswith('.json') and not n.endswith('.partial.json')) \
      if os.path.isdir(runs_dir) else []
  return [_read(os.path.join(runs_dir, n), None) for n in names]


def setting_row(name, runs):
  setting = SETTINGS[name]
  runs = sorted(runs, key=lambda r: r['seed'])
  best = {str(r['seed']): r['best'] for r in runs}
  s_cross = {str(r['seed']): (r['s_cross_at_best'] or {}).get('mean_percent') for r in runs}
  at_best = [r['s_cross_at_best'] for r in runs if r.get('s_cross_at_best')]
  curve = {}
  for r in runs:
    for p in r['curve']:
      curve.setdefault(f"{p['interval']}@{p['cfg_scale']:g}", []).append(p['fd'])
  row = {'name': name, 'description': setting.description, 'table': setting.table,
         'group_size': setting.group_size, 'seeds': [r['seed'] for r in runs],
         'best_fd_per_seed': {s: b['fd'] for s, b in best.items()},
         'best_point_per_seed': {s: f"{b['interval']}@{b['cfg_scale']:g}" for s, b in best.items()},
         'class_accuracy_per_seed': {s: b['class_accuracy'] for s, b in best.items()},
         'precision_per_seed': {s: b.get('precision') for s, b in best.items()},
         'recall_per_seed': {s: b.get('recall') for s, b in best.items()},
         's_cross_per_seed': s_cross,
         's_cross_per_stage_at_best': table1_stats.mean_of_dicts([t['per_stage_percent'] for t in at_best]),
         's_cross_per_layer_at_best': table1_stats.mean_of_dicts([t['per_layer_percent'] for t in at_best]),
         'fd_curve_per_seed': {str(r['seed']): {f"{p['interval']}@{p['cfg_scale']:g}": p['fd'] for p in r['curve']}
                               for r in runs},
         'fd_curve_mean': {k: float(np.mean(v)) for k, v in curve.items()},
         'group_branch_curve_per_seed': {str(r['seed']): r.get('group_branch_curve') for r in runs
                                         if r.get('group_branch_curve')},
         'train_seconds': float(sum(r.get('train_seconds') or 0 for r in runs)),
         'sample_seconds': float(sum(p.get('sample_seconds', 0) for r in runs for p in r['curve']))}
  for key in ('best_fd', 'class_accuracy', 'precision', 'recall', 's_cross'):
    row[key], row[key + '_sd'] = table1_stats.mean_sd(list(row[key + '_per_seed'].values()))
  return row


def comparisons(rows):
  found = []
  for name, a, b, direction in COMPARISONS:
    if a in rows and b in rows:
      per_seed = lambda row: {int(s): v for s, v in rows[row]['best_fd_per_seed'].items()}
      fd = table1_stats.paired_difference(per_seed(a), per_seed(b), direction)
      found.append({'name': name, 'a': a, 'b': b, 'metric': 'best FD', **fd,
                    'sentence': table1_stats.sentence(f'{name} ({a} - {b})', fd, metric='FD')})
  return found


def expected_runs(args):
  """'<row>_seed<k>' of every run the sweep's --settings / --seeds / --long_seeds ask for."""
  seeds = [int(s) for s in args.seeds.split(',') if s]
  long_seeds = {int(s) for s in args.long_seeds.split(',') if s}
  names = [n for n in args.settings.split(',') if n in SETTINGS]
  return [f'{n}_seed{k}' for k in seeds for n in names if SETTINGS[n].table != 4 or k in long_seeds]


def in_progress(runs_dir):
  """{'<row>_seed<k>': curve points scored so far} of the runs still sampling (partial.json)."""
  found = {}
  for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
    if name.endswith('.partial.json'):
      partial = _read(os.path.join(runs_dir, name), {})
      found[name[:-len('.partial.json')]] = {
          'trained': partial.get('losses') is not None,
          'curve': {f"{p['interval']}@{p['cfg_scale']:g}": {k: p.get(k) for k in ('fd', 'class_accuracy')}
                    for p in partial.get('curve', [])}}
  return found


def build(args):
  meta = _read(os.path.join(args.out, 'meta.json'), {})
  invocations = _read(os.path.join(args.out, 'invocations.json'), [])
  runs = [r for r in load_runs(args.runs) if r and r.get('setting') in SETTINGS]
  finished = {f"{r['setting']}_seed{r['seed']}" for r in runs}
  missing = [n for n in expected_runs(args) if n not in finished]
  by_setting = {}
  for r in runs:
    by_setting.setdefault(r['setting'], []).append(r)
  rows = {n: setting_row(n, by_setting[n]) for n in SETTINGS if n in by_setting}
  # S_cross is 0 by definition for two images (docs/method.md), so UC = 2 says nothing about attention.
  grouped = [r for r in rows.values() if r['table'] == 1 and r['group_size'] > 2 and r['s_cross'] is not None]
  return {
      'what': 'GroupDiff-l on Fashion-MNIST (issue 31): experiments/fashion_table1.py; docs/results.md',
      'status': 'partial' if missing else 'complete',
      'missing_runs': missing,
      'in_progress': in_progress(args.runs),
      'evaluator_test_accuracy': meta.get('evaluator_test_accuracy'),
      'fd_test_vs_train': meta.get('fd_test_vs_train'),
      'neighbour_purity': meta.get('neighbour_purity'),
      'meta': {k: v for k, v in meta.items() if k != 'neighbour_dirs'},
      'commands': [i['command'] for i in invocations],
      'wall_seconds': float(sum(i.get('wall_seconds', 0) for i in invocations)),
      'num_runs': len(runs),
      'settings': list(rows.values()),
      'comparisons': comparisons(rows),
      'correlation_s_cross_fd': {
          **table1_stats.pearson([r['s_cross'] for r in grouped], [r['best_fd'] for r in grouped]),
          'names': [r['name'] for r in grouped]},
  }


def _fmt(value, sd=None, digits=2):
  if value is None:
    return '-'
  return f'{value:.{digits}f}' + (f' ± {sd:.{digits}f}' if sd is not None else '')


def markdown(report):
  lines = []
  if report['status'] != 'complete':
    lines += [f"**PARTIAL: {report['num_runs']} runs finished, {len(report['missing_runs'])} not yet "
              f"({', '.join(report['missing_runs'][:6])}{' ...' if len(report['missing_runs']) > 6 else ''}). "
              'Nothing below is a final result: a comparison pairs the seeds both rows have so far (n), with no '
              'interval below 2, and its verdict may change when the other seeds finish.**', '']
  lines += [f"Evaluator test accuracy {_fmt(report['evaluator_test_accuracy'], digits=4)}; FD test vs train "
           f"{_fmt(report['fd_test_vs_train'], digits=3)}; runs finished: {report['num_runs']}.", '',
           '| row | seeds | best FD | best point (per seed) | class acc. | precision | recall | S_cross % |',
           '|---|---|---|---|---|---|---|---|']
  for r in report['settings']:
    lines.append(f"| {r['name']} | {len(r['seeds'])} | {_fmt(r['best_fd'], r['best_fd_sd'])} | "
                 f"{', '.join(r['best_point_per_seed'].values())} | "
                 f"{_fmt(r['class_accuracy'], r['class_accuracy_sd'], 3)} | "
                 f"{_fmt(r['precision'], None, 3)} | {_fmt(r['recall'], None, 3)} | {_fmt(r['s_cross'])} |")
  lines += ['', 'Per seed (each at its best point, re-sampled with 5,000 images; a point is where guidance acts, '
            '`official` = only in t in [0.25, 0.75], `all` = the whole trajectory, @ its CFG scale):', '',
            '| row | seed | best point | FD | class acc. | precision | recall |', '|---|---|---|---|---|---|---|']
  for r in report['settings']:
    for seed, fd in r['best_fd_per_seed'].items():
      lines.append(f"| {r['name']} | {seed} | {r['best_point_per_seed'][seed]} | {_fmt(fd)} | "
                   f"{_fmt(r['class_accuracy_per_seed'][seed], digits=3)} | "
                   f"{_fmt(r['precision_per_seed'][seed], digits=3)} | {_fmt(r['recall_per_seed'][seed], digits=3)} |")
  learning = [(r['name'], seed, c) for r in report['settings'] for seed, curve in
              r['group_branch_curve_per_seed'].items() for c in curve]
  if learning:
    lines += ['', 'Unconditional branch, velocity MSE with group attention on minus off (mean over the t grid; '
              '< 0: the group helps), held-out groups:', '',
              '| row | seed | step | similarity | same class | random |', '|---|---|---|---|---|---|']
    for name, seed, c in learning:
      gaps = [float(np.mean([v['on'] - v['off'] for v in c[kind].values()])) for kind in ('similarity', 'class',
                                                                                        'random')]
      lines.append(f"| {name} | {seed} | {c['step']} | " + ' | '.join(f'{g:+.4f}' for g in gaps) + ' |')
  grouped = [r for r in report['settings'] if r['s_cross_per_stage_at_best']]
  if grouped:
    stages = sorted({k for r in grouped for k in r['s_cross_per_stage_at_best']}, key=float)
    layers = sorted({k for r in grouped for k in r['s_cross_per_layer_at_best']}, key=int)
    lines += ['', 'S_cross (%) on the sampling trajectory at each row\'s best point (mean over seeds; "-": the '
              'unconditional branch ran ungrouped there), per stage (t from, 0 = noise) and per block:', '',
              '| row | ' + ' | '.join(f't {k}' for k in stages) + ' | ' + ' | '.join(f'block {k}' for k in layers) + ' |',
              '|---|' + '---|' * (len(stages) + len(layers))]
    for r in grouped:
      cells = [r['s_cross_per_stage_at_best'].get(k) for k in stages] + [r['s_cross_per_layer_at_best'].get(k)
                                                                         for k in layers]
      lines.append(f"| {r['name']} | " + ' | '.join(_fmt(c) for c in cells) + ' |')
    c = report['correlation_s_cross_fd']
    lines += ['', f"Pearson r of S_cross and best FD over the {c['n']} Table 1 rows with groups of more than two "
              f"(S_cross is 0 by definition for two): {_fmt(c.get('r'))} (p = {_fmt(c.get('p'), digits=3)})."]
  lines += ['', '| comparison | seeds paired | mean difference [95% interval] | verdict |', '|---|---|---|---|']
  for c in report['comparisons']:
    interval = f"[{c['interval'][0]:+.2f}, {c['interval'][1]:+.2f}]" if c['interval'] else '(no interval: n < 2)'
    lines.append(f"| {c['name']} | {c['n']} | {c['mean']:+.2f} {interval} | {c['verdict']} |")
  return '\n'.join(lines) + '\n'


def figures(report, docs_dir):
  series = []
  for r in report['settings']:
    for interval in ('all', 'official'):
      points = sorted((float(k.split('@')[1]), v) for k, v in r['fd_curve_mean'].items()
                      if k.startswith(interval + '@') or (interval == 'official' and k == 'all@1'))
      if points:
        series.append({'label': f"{r['name']} ({interval})", 'x': [p[0] for p in points], 'y': [p[1] for p in points]})
  if series:
    plots.plot(os.path.join(docs_dir, 'fd_vs_cfg.png'), series, 'CFG scale', 'FD (evaluator features)',
               'Fashion-MNIST: FD vs CFG (mean over seeds)')
  sims = [r for r in report['settings'] if r['name'] in ('sim_uc2', 'sim_uc4', 'sim_uc8')]
  if sims:
    plots.plot(os.path.join(docs_dir, 'fd_vs_group_size.png'),
               [{'label': 'learned-encoder groups', 'x': [r['group_size'] for r in sims],
                 'y': [r['best_fd'] for r in sims], 'yerr': [r['best_fd_sd'] or 0 for r in sims]}],
               'UC (group size)', 'best FD', 'Fashion-MNIST: best FD vs group size (mean ± sd over seeds)')
  table2 = [r for r in report['settings'] if r['table'] == 2 or r['name'] == 'sim_uc4']
  if table2:
    plots.bar_plot(os.path.join(docs_dir, 'table2.png'),
                   [{'label': r['name'].replace('sim_uc4_', ''), 'value': r['best_fd'], 'err': r['best_fd_sd']}
                    for r in table2], 'best FD', 'Fashion-MNIST Table 2 (sim_uc4 at inference)')
  learning = []
  for r in report['settings']:
    for seed, curve in r['group_branch_curve_per_seed'].items():
      for kind in ('similarity', 'class', 'random'):
        # error with group attention on minus off, averaged over the t grid: < 0 where the group helps
        learning.append({'label': f"{r['name']} s{seed} {kind}", 'x': [c['step'] for c in curve],
                         'y': [float(np.mean([v['on'] - v['off'] for v in c[kind].values()])) for c in curve]})
  if learning:
    plots.plot(os.path.join(docs_dir, 'group_branch_learning_curve.png'), learning, 'training step',
               'velocity MSE, group attention on - off', 'Unconditional branch: does the group help? (< 0: yes)')
  grouped = [r for r in report['settings'] if r['s_cross'] is not None and r['table'] == 1 and r['group_size'] > 2]
  if grouped:
    plots.plot(os.path.join(docs_dir, 's_cross_vs_fd.png'),
               [{'label': 'Table 1 rows, UC > 2', 'x': [r['s_cross'] for r in grouped], 'y': [r['best_fd'] for r in grouped],
                 'point_labels': [r['name'] for r in grouped]}], 'S_cross (%)', 'best FD',
               'Fashion-MNIST: S_cross vs FD', lines=False)


def grids(report, runs_dir, grid_dir):
  """grids/<row>.png: the first finished seed's saved samples, one class per grid row of its group size."""
  os.makedirs(grid_dir, exist_ok=True)
  for row in report['settings']:
    seed = min(row['seeds'])
    path = os.path.join(runs_dir, f"{row['name']}_seed{seed}_samples.npz")
    if os.path.exists(path):
      per_row = row['group_size'] if row['group_size'] > 1 else 4
      with np.load(path) as npz:
        save_grid(npz['images'][:10 * per_row], per_row, os.path.join(grid_dir, f"{row['name']}.png"))


def write(args):
  report = build(args)
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, 'w') as f:
    json.dump(report, f, indent=1)
  os.makedirs(os.path.join(args.docs_dir, 'samples'), exist_ok=True)
  with open(os.path.join(args.docs_dir, 'table.md'), 'w') as f:
    f.write(markdown(report))
  figures(report, args.docs_dir)
  for name in sorted(os.listdir(args.runs)) if os.path.isdir(args.runs) else []:
    if name.endswith('_samples.npz'):
      shutil.copyfile(os.path.join(args.runs, name), os.path.join(args.docs_dir, 'samples', name))
  grids(report, args.runs, os.path.join(args.docs_dir, 'grids'))
  print(markdown(report))
  print(f'Report: {os.path.abspath(args.json)}')
  return report
