"""The machine-readable report of the toy Table 1/2 sweep (docs/table1.json) and its markdown table.

Built only from the per-run JSON files experiments/table1.py writes (one
per setting and seed, in its runs directory), the sweep's meta.json and
its invocation log, so a sweep resumed over several sessions reports all
of its runs. Definitions are in the report itself ('definitions').
"""

import json
import os

import numpy as np

from experiments import table1_settings, table1_stats

GROUPING_NAMES = {None: 'none', 'official_plan': 'similarity', 'random': 'random', 'class': 'class'}
DEFINITIONS = {
    'fd': 'Frechet distance between generated and real training images in the feature space of the toy evaluator '
          '(FD_toy; not comparable with ImageNet FID); lower is better',
    'class_accuracy': "fraction of generated images the evaluator classifies as their conditioning class",
    's_cross': "percent; docs/method.md, S_cross (our reading) measured on the sampler's own trajectory: the x_t, "
               'time, null labels and sample ids of the unconditional group branch at every step that runs it '
               'grouped (evaluation/s_cross.py, make_trajectory_sampler); masses averaged over those steps and the layers, then '
               'scored; mean over the probed groups',
    's_cross_renoised': 'percent; the final samples noised back to each stage by the forward process, one probe '
                        'pass per stage (evaluation/s_cross.py, renoised_masses)',
    'self_mass_fraction': "attention mass a member's queries keep on its own tokens (1/N: uniform over the group)",
    'share_histogram': 'counts of a_ij (j != i, renormalised over the other members) over probed steps, layers, '
                       'groups and members, summed over seeds; uniform_share = 1/(N-1)',
    'comparisons': 'paired over seeds (same seed: same data order and sampling noise): difference a - b, 95% '
                   't-interval, paired t-test; verdict against the paper direction (experiments/table1_stats.py)',
}


def load_runs(runs_dir):
  """Every finished run record in runs_dir (sorted by file name)."""
  runs = []
  for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
    if name.endswith('.json'):
      with open(os.path.join(runs_dir, name)) as f:
        runs.append(json.load(f))
  return runs


def setting_row(name, runs):
  """The report row of one setting from its runs (one per seed)."""
  setting = table1_settings.SETTINGS[name]
  runs = sorted(runs, key=lambda r: r['seed'])
  per_seed = lambda key: {str(r['seed']): r[key] for r in runs}
  trajectory = [r['s_cross'] for r in runs if r.get('s_cross')]
  renoised = [r['s_cross_renoised'] for r in runs if r.get('s_cross_renoised')]
  fd, fd_sd = table1_stats.mean_sd([r['fd'] for r in runs])
  accuracy, accuracy_sd = table1_stats.mean_sd([r['class_accuracy'] for r in runs])
  s_cross, s_cross_sd = table1_stats.mean_sd([t['mean_percent'] for t in trajectory])
  row = {
      'name': name, 'description': setting.description, 'table': setting.table, 'group_size': setting.group_size,
      'grouping': GROUPING_NAMES[setting.grouping], 'sigma_tv': setting.sigma_tv,
      'group_stage_fraction': setting.group_stage_fraction, 'group_layers': runs[0].get('group_layers'),
      'trained_from': setting.trained_from, 'seeds': [r['seed'] for r in runs],
      'fd': fd, 'fd_sd': fd_sd, 'fd_per_seed': per_seed('fd'),
      'class_accuracy': accuracy, 'class_accuracy_sd': accuracy_sd,
      'class_accuracy_per_seed': per_seed('class_accuracy'),
      's_cross': s_cross, 's_cross_sd': s_cross_sd,
      's_cross_per_seed': {str(r['seed']): r['s_cross']['mean_percent'] for r in runs if r.get('s_cross')},
      's_cross_per_stage': table1_stats.mean_of_dicts([t['per_stage_percent'] for t in trajectory]),
      's_cross_per_layer': table1_stats.mean_of_dicts([t['per_layer_percent'] for t in trajectory]),
      's_cross_renoised': table1_stats.mean_sd([t['mean_percent'] for t in renoised])[0],
      's_cross_renoised_per_stage': table1_stats.mean_of_dicts([_renoised_per_stage(t) for t in renoised]),
      'self_mass_fraction': table1_stats.mean_sd([t['self_mass_fraction'] for t in trajectory])[0],
      'self_mass_fraction_per_layer': table1_stats.mean_of_dicts([t['self_mass_fraction_per_layer'] for t in trajectory]),
      'self_mass_fraction_per_stage': table1_stats.mean_of_dicts([t['self_mass_fraction_per_stage'] for t in trajectory]),
      'uniform_share': trajectory[0]['uniform_share'] if trajectory else None,
      'share_histogram': None,
      'train_seconds': float(sum(r['train_seconds'] for r in runs)),
      'sample_seconds': float(sum(r['sample_seconds'] for r in runs)),
  }
  histograms = [t['share_histogram'] for t in trajectory if t.get('share_histogram')]
  if histograms:
    row['share_histogram'] = {'edges': histograms[0]['edges'],
                              'counts': np.sum([h['counts'] for h in histograms], 0).astype(int).tolist()}
  return row


def _renoised_per_stage(renoised):
  """{stage: percent} of a re-noised S_cross report; run records written before the one S_cross schema hold
  fractions under 'per_stage' with keys str(float)."""
  if 'per_stage_percent' in renoised:
    return renoised['per_stage_percent']
  return {f'{float(k):g}': None if v is None else 100.0 * v for k, v in renoised['per_stage'].items()}


def comparisons(rows):
  """Every COMPARISONS entry whose two settings have runs: paired FD over seeds (its verdict), and beside it
  class accuracy (the opposite direction) and trajectory S_cross (the paper's direction, where it has one)."""
  found = []
  for name, a, b, direction, paper, s_cross_direction in table1_settings.COMPARISONS:
    if a not in rows or b not in rows:
      continue
    per_seed = lambda row, key: {int(s): v for s, v in rows[row][key].items()}
    paired = lambda key, towards: table1_stats.paired_difference(per_seed(a, key), per_seed(b, key), towards)
    fd = paired('fd_per_seed', direction)
    found.append({'name': name, 'a': a, 'b': b, 'metric': 'fd', 'paper': paper, **fd,
                  'sentence': table1_stats.sentence(f'{name} ({a} - {b})', fd),
                  'class_accuracy': paired('class_accuracy_per_seed', 'higher' if direction == 'lower' else 'lower'),
                  's_cross': paired('s_cross_per_seed', s_cross_direction) if s_cross_direction else None})
  return found


def correlations(rows, runs):
  """Pearson r of S_cross (trajectory; re-noised) and FD over the grouped Table 1 settings and their runs."""
  grouped = [r for r in rows.values() if r['table'] == 1 and r['group_size'] > 1 and r['s_cross'] is not None]
  names = {r['name'] for r in grouped}
  grouped_runs = [r for r in runs if r['setting'] in names and r.get('s_cross')]
  renoised = [r for r in grouped if r['s_cross_renoised'] is not None]
  return {
      'settings': {**table1_stats.pearson([r['s_cross'] for r in grouped], [r['fd'] for r in grouped]),
                   'names': [r['name'] for r in grouped]},
      'runs': table1_stats.pearson([r['s_cross']['mean_percent'] for r in grouped_runs],
                                   [r['fd'] for r in grouped_runs]),
      'renoised_settings': table1_stats.pearson([r['s_cross_renoised'] for r in renoised],
                                                [r['fd'] for r in renoised]),
  }


def build_report(runs, meta, invocations, settings):
  """The docs/table1.json dict. runs: records of load_runs; meta: the sweep's meta.json; invocations: its
  invocation log (command, wall_seconds, machine per call of experiments/table1.py); settings: row order."""
  by_setting = {}
  for run in runs:
    if run['setting'] in settings:
      by_setting.setdefault(run['setting'], []).append(run)
  rows = {name: setting_row(name, by_setting[name]) for name in settings if name in by_setting}
  accuracy = meta.get('evaluator_real_accuracy')
  return {
      'evaluator_real_accuracy': accuracy,
      'fd_real_held_out': meta.get('fd_real_held_out'),
      'machine': meta.get('machine'),
      'commands': [i['command'] for i in invocations],
      'wall_seconds': float(sum(i['wall_seconds'] for i in invocations)),
      'run_seconds': float(sum(r['train_seconds'] + r['sample_seconds'] for r in runs if r['setting'] in settings)),
      'invocations': invocations,
      'num_runs': sum(len(v) for v in by_setting.values()),
      'definitions': DEFINITIONS,
      'settings': list(rows.values()),
      'comparisons': comparisons(rows),
      'correlation_s_cross_fd': correlations(rows, runs),
      'meta': {k: v for k, v in meta.items() if k != 'config'},
      'config': meta.get('config'),
  }


def markdown_table(report):
  """The rows as a markdown table (mean ± sd over seeds) and the comparisons' sentences."""
  fmt = lambda m, s, d=2: '-' if m is None else (f'{m:.{d}f}' + ('' if s is None else f' ± {s:.{d}f}'))
  lines = ['| setting | UC | grouping | sigma_tv | stages | seeds | FD_toy ↓ | class acc. % ↑ | S_cross % '
           '(trajectory) | S_cross % (re-noised) | self mass |', '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in report['settings']:
    accuracy_sd = None if r['class_accuracy_sd'] is None else 100 * r['class_accuracy_sd']
    layers = '' if r['group_layers'] is None else f", blocks {r['group_layers']}"
    lines.append(f"| {r['description']} | {r['group_size']} | {r['grouping']} | {r['sigma_tv']} | "
                 f"0-{r['group_stage_fraction']:g}{layers} | {len(r['seeds'])} | {fmt(r['fd'], r['fd_sd'])} | "
                 f"{fmt(100 * r['class_accuracy'], accuracy_sd, 1)} | {fmt(r['s_cross'], r['s_cross_sd'])} | "
                 f"{fmt(r['s_cross_renoised'], None)} | {fmt(r['self_mass_fraction'], None, 3)} |")
  lines.append('')
  lines += [f"- {c['sentence']}" for c in report['comparisons']]
  corr = report['correlation_s_cross_fd']['settings']
  if corr['r'] is not None:
    lines.append(f"- S_cross vs FD over {corr['n']} grouped settings: Pearson r = {corr['r']:.2f} "
                 f"(p = {corr['p']:.3g}).")
  return '\n'.join(lines) + '\n'


def write_report(report, json_path, table_path):
  """Write the report as JSON (atomically) and the markdown table."""
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  write_json(json_path, report)
  with open(table_path, 'w') as f:
    f.write(markdown_table(report))


def write_bytes(path, data):
  """data to path through a temporary file (a cut-short write never looks like a finished file)."""
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_json(path, value):
  """json.dump to path through a temporary file, so an interrupted write never leaves half a file."""
  tmp = f'{path}.{os.getpid()}.tmp'  # per process: two sweeps over other seeds may share the folder
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)
