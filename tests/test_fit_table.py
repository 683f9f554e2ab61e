"""benchmarks/fit_table.py's table from hand-made compile reports (no compiling)."""

import json
import os

from tests import benchmark_module

GIB = 2**30


def fit_table():
  return benchmark_module.load('fit_table')


def report(kind, peak_gib):
  program = {'memory_bytes_per_device': {'argument': 2 * GIB, 'temp': 1 * GIB, 'peak': peak_gib * GIB},
             'collectives': {'all-reduce': {'count': 3, 'bytes': GIB // 2}}, 'compile_seconds': 12.0, 'kind': kind,
             'estimated_step_seconds (compiler estimate)': 0.5, 'mfu (compiler estimate)': 0.25}
  return {'topology': 'v5p:2x2x2', 'mesh': {'data': 8, 'fsdp': 1}, 'batch_size': 32, 'remat': 'none',
          'headroom': 0.1, 'chip': {'hbm_bytes': 10 * GIB, 'bf16_flops': 1e12, 'devices_per_chip': 1},
          'programs': {'train_step/singles': program}}


def test_rows_label_conditional_groups_and_judge_the_fit_against_hbm_less_headroom(tmp_path, monkeypatch, capsys):
  module = fit_table()
  rows = (('f_row', 'c.py', 'v5p:2x2x2', 1, []), ('l_row', 'c.py', 'v5p:2x2x2', 1, []),
          ('refused_row', 'c.py', 'v5p:2x2x2', 1, []), ('queued_row', 'c.py', 'v5p:2x2x2', 1, []))
  monkeypatch.setattr(module, 'ROWS', rows)
  for name, kind, peak in (('f_row', [['32', '4', 'True']], 8.5), ('l_row', [['32', '1', 'True']], 9.5)):
    os.makedirs(tmp_path / name)
    made = report(kind, peak)
    if name == 'f_row':  # written with today's collective count; l_row without the field (an old report)
      made['collective_bytes'] = module.COLLECTIVE_BYTES_RULE
      made['programs']['train_step/singles'].update({
          'compiler_flops_per_device': 4.59e12, 'compiler_bytes_accessed_per_device': 2.765e10,
          'analytic_model_flops_per_device': 2.295e12, 'analytic_attention_flops_per_device': 0.0})
    (tmp_path / name / 'compile_report.json').write_text(json.dumps(made))
  os.makedirs(tmp_path / 'refused_row')
  (tmp_path / 'refused_row' / 'log.txt').write_text('noise\nError: 8 groups over 16 devices.\n')
  module.table(str(tmp_path))
  cells = [[c.strip() for c in line.strip('|').split('|')] for line in capsys.readouterr().out.splitlines()[2:]]
  lines = {row[0]: row for row in cells}
  assert lines['f_row'][6] == 'train_step/singles (cond. groups of 4)' and lines['f_row'][11] == 'yes'  # 8.5 <= 9
  assert lines['l_row'][6] == 'train_step/singles' and lines['l_row'][11] == 'no'  # 9.5 > 0.9 x 10 GiB
  assert lines['f_row'][2:4] == ['8, 1, 1', 'no']  # reports from before the group axis and ZeRO
  # Roofline from the report's own counts at today's v5p figures (459 TFLOP/s, 2765 GB/s, 600 GB/s ICI):
  # max(0.01 s compute, 0.01 s memory) + the all-reduce's 0.5 GiB twice over ICI; MFU = model FLOPs / that.
  roof = 0.01 + 2 * (GIB // 2) / 600e9
  assert lines['f_row'][9:18] == ['8.50', '10', 'yes', '3, 0.50', '0.500', '25%', f'{roof:.3f}',
                                  f'{2.295e12 / (roof * 459e12):.0%}', '12']
  assert lines['l_row'][15:17] == ['n/a', 'n/a']  # a report without the FLOP and byte counts
  assert lines['l_row'][12] == '3, 0.50 (old count)'  # counted before compiled_stats' chain and loop rules
  assert lines['refused_row'][11:13] == ['no', 'Error: 8 groups over 16 devices.']
  assert lines['queued_row'][11] == 'not compiled yet'
