"""Fit table of docs/scaling.md from compile reports: every number is the TPU compiler's.

  python benchmarks/fit_table.py run  OUT_DIR        # compile each row (--mode=compile), one subprocess per row
  python benchmarks/fit_table.py table OUT_DIR       # markdown table from OUT_DIR/*/compile_report.json

ROWS: (name, config, topology, num_slices, overrides). A row that failed (does not fit, or was not run) appears
as missing with its log's last line.
"""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from groupdiff_jax import compile_job  # pylint: disable=wrong-import-position
ROWS = (
    ('sit_xl_l4_b256_v5e64', 'configs/sit_xl.py', 'v5e:8x8', 1, []),
    ('sit_xl_l4_b256_v5p64', 'configs/sit_xl.py', 'v5p:4x4x2', 1, []),
    ('sit_xl_l4_b256_v4_32', 'configs/sit_xl.py', 'v4:2x2x4', 1, []),
    ('sit_xl_l4_b256_v6e64', 'configs/sit_xl.py', 'v6e:8x8', 1, []),
    ('sit_xl_l4_b1024_v5e64', 'configs/sit_xl.py', 'v5e:8x8', 1, ['--config.train.batch_size=1024']),
    ('dit_xl_l4_b256_v5e64', 'configs/dit_xl.py', 'v5e:8x8', 1, []),
    ('sit_xl_f4_b256_v5e64', 'configs/sit_xl.py', 'v5e:8x8', 1, ['--config.train.mode=groupdiff_f']),
    ('sit_xl_uc16_b256_v5e64', 'configs/sit_xl.py', 'v5e:8x8', 1,
     ['--config.train.group_size=16', '--config.model.max_group_size=16']),
    ('sit_xl_l4_b256_2x_v5p64', 'configs/sit_xl.py', 'v5p:4x4x2', 2, ['--config.mesh.dcn_data=2']),
)


def run(out_dir):
  for name, config, topology, slices, extra in ROWS:  # pylint: disable=unused-variable
    workdir = os.path.join(out_dir, name)
    if os.path.exists(os.path.join(workdir, 'compile_report.json')):
      continue
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'log.txt'), 'w') as log:
      subprocess.run([sys.executable, '-m', 'groupdiff_jax.main', f'--config={config}', f'--workdir={workdir}',
                      '--mode=compile', f'--config.compile.topology={topology}',
                      f'--config.compile.num_slices={slices}', *extra], cwd=ROOT, stdout=log, stderr=log,
                     env={**os.environ, 'PYTHONPATH': ROOT}, check=False)


def table(out_dir):
  lines = ['| row | topology | mesh | batch | remat | program | peak GiB/device | fits | collectives | '
           'est. step s | est. MFU | compile s |', '|' + '---|' * 12]
  for path in sorted(glob.glob(os.path.join(out_dir, '*', 'compile_report.json'))):
    report = json.load(open(path))
    for program, p in report['programs'].items():
      # Reports written before the bytes were summed over combined (tuple) all-reduces undercount them.
      counted = report.get('collective_bytes') == compile_job.COLLECTIVE_BYTES_RULE
      coll = sum(c['bytes'] for c in p['collectives'].values()) / 2**30 if counted else None
      ops = sum(c['count'] for c in p['collectives'].values())
      est = p.get('estimated_step_seconds (compiler estimate)')
      mfu = p.get('mfu (compiler estimate)')
      lines.append(f"| {os.path.basename(os.path.dirname(path))} | {report['topology']} x{report['num_slices']} | "
                   f"{report['mesh']} | {report['batch_size']} | {report['remat']} | {program} | "
                   f"{p['memory_bytes_per_device']['peak'] / 2**30:.2f} | {p['fits']} | "
                   f"{ops} ops, {'bytes not counted (old report)' if coll is None else f'{coll:.2f} GiB'} | "
                   f"{'n/a' if est is None else f'{est:.3f}'} | {'n/a' if mfu is None else f'{mfu:.0%}'} | "
                   f"{p['compile_seconds']:.0f} |")
  print('\n'.join(lines))


if __name__ == '__main__':
  {'run': run, 'table': table}[sys.argv[1]](sys.argv[2])
