"""Fit table of docs/scaling.md from compile reports: every number is the TPU compiler's.

  python benchmarks/fit_table.py run  OUT_DIR        # compile each row (--mode=compile), one subprocess per row
  python benchmarks/fit_table.py table OUT_DIR       # markdown table: ROWS in order, from OUT_DIR/<row>/

ROWS: (name, config, topology, num_slices, overrides). A row refused before compiling shows its log's last
`Error:` line; a row not compiled yet shows as missing.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from groupdiff_jax.compile_job import roofline  # noqa: E402  pylint: disable=wrong-import-position
from groupdiff_jax.compiled_stats import COLLECTIVE_BYTES_RULE  # noqa: E402  pylint: disable=wrong-import-position
from groupdiff_jax.tpu_topology import CHIPS, chip_of  # noqa: E402  pylint: disable=wrong-import-position
# Rows in the order they are compiled (most informative first). Pod names count chips as Google Cloud does:
# v4-32 = 16 chips (v4:2x2x4), v5e-64 = 64 (v5e:8x8), v5e-256 = 256 (v5e:16x16), v5p-64 = 32 (v5p:4x4x2),
# v5p-256 = 128 (v5p:4x4x8), v6e-64 = 64 (v6e:8x8). A SiT-XL/2 train step takes 5-11 min to compile on
# one of this machine's 2 cores, so most rows compile one step kind (SINGLES_ONLY: the conditional step,
# the larger one on v5p:2x2x2 and v5p:4x4x2) and the sampler once per chip kind at most (it does not
# depend on the training batch or mesh).
NO_SAMPLER = '--config.compile.sampler=False'
SINGLES_ONLY = '--config.compile.step_kinds=singles'
GROUPS_ONLY = '--config.compile.step_kinds=groups'
B1024 = '--config.train.batch_size=1024'
UC16 = ('--config.train.group_size=16', '--config.model.max_group_size=16')
F4 = '--config.train.mode=groupdiff_f'
# Rows that split a group were compiled with K/V all-gathers, the default until the fifth session.
AG = '--config.mesh.group_collective=all_gather'
ROWS = (
    ('sit_xl_l4_b256_v5p64', 'configs/sit_xl.py', 'v5p:4x4x2', 1, []),
    # The same with today's defaults (mesh.shard_update on: ZeRO-2), 2026-12-06; the rows without `_zero`
    # were compiled before it existed (replicated state: --config.mesh.shard_update=False).
    ('sit_xl_l4_b256_v5p64_zero', 'configs/sit_xl.py', 'v5p:4x4x2', 1, [NO_SAMPLER, SINGLES_ONLY]),
    # Fourth session: v6e-64 with today's defaults (the `sit_xl_l4_b256_v6e64` row predates ZeRO), and the groups
    # step of v5e-256 (each group split over 4 devices) with heads exchanged by all-to-all instead of K/V gathered.
    ('sit_xl_l4_b256_v6e64_zero', 'configs/sit_xl.py', 'v6e:8x8', 1, [NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b256_v5e256_a2a', 'configs/sit_xl.py', 'v5e:16x16', 1,
     [NO_SAMPLER, GROUPS_ONLY, '--config.mesh.group_collective=all_to_all']),
    # Fifth session: the same comparison where a group is split over 2 devices (v5p-256).
    ('sit_xl_l4_b256_v5p256_a2a', 'configs/sit_xl.py', 'v5p:4x4x8', 1,
     [NO_SAMPLER, GROUPS_ONLY, '--config.mesh.group_collective=all_to_all']),
    # Fifth session: with the sharded update (default) does v5e-64 still need fsdp (configs/pod_meshes.py)?
    ('sit_xl_l4_b256_v5e64_zero', 'configs/sit_xl.py', 'v5e:8x8', 1, [NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b256_v5e64_fsdp4_zero', 'configs/sit_xl.py', 'v5e:8x8', 1,
     ['--config.mesh.fsdp=4', NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b1024_v5e64_zero', 'configs/sit_xl.py', 'v5e:8x8', 1, [B1024, NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b1024_v5e256_zero', 'configs/sit_xl.py', 'v5e:16x16', 1, [B1024, NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b1024_v5e256_fsdp4_zero', 'configs/sit_xl.py', 'v5e:16x16', 1,
     [B1024, '--config.mesh.fsdp=4', NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b1024_v4_32_zero', 'configs/sit_xl.py', 'v4:2x2x4', 1, [B1024, NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b256_v5e64_fsdp4', 'configs/sit_xl.py', 'v5e:8x8', 1, ['--config.mesh.fsdp=4', NO_SAMPLER]),
    ('sit_xl_l4_b256_v5e256', 'configs/sit_xl.py', 'v5e:16x16', 1, [AG, NO_SAMPLER]),  # mesh.group=0: groups over 4
    ('sit_xl_l4_b256_v5p256', 'configs/sit_xl.py', 'v5p:4x4x8', 1, [AG, NO_SAMPLER]),  # mesh.group=0: groups over 2
    ('sit_xl_l4_b256_v6e64', 'configs/sit_xl.py', 'v6e:8x8', 1, [NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b256_v4_32', 'configs/sit_xl.py', 'v4:2x2x4', 1, [NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b1024_v5e256_fsdp4', 'configs/sit_xl.py', 'v5e:16x16', 1,
     [B1024, '--config.mesh.fsdp=4', NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b1024_v5p256', 'configs/sit_xl.py', 'v5p:4x4x8', 1, [B1024, NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b256_v5p64_fsdp8', 'configs/sit_xl.py', 'v5p:4x4x2', 1,
     ['--config.mesh.fsdp=8', NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b256_2slices_v5p64', 'configs/sit_xl.py', 'v5p:4x4x2', 2,
     ['--config.mesh.dcn_data=2', NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b256_v5e64_fsdp4', 'configs/dit_xl.py', 'v5e:8x8', 1,
     ['--config.mesh.fsdp=4', NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_f4_b256_v5e64_fsdp4', 'configs/sit_xl.py', 'v5e:8x8', 1,
     [F4, '--config.mesh.fsdp=4', NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_uc16_b256_v4_32', 'configs/sit_xl.py', 'v4:2x2x4', 1,
     [AG, *UC16, NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_l4_b1024_v5e64_fsdp8', 'configs/sit_xl.py', 'v5e:8x8', 1,
     [B1024, '--config.mesh.fsdp=8', NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b1024_v5p64', 'configs/sit_xl.py', 'v5p:4x4x2', 1, [B1024, NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b1024_v6e64', 'configs/sit_xl.py', 'v6e:8x8', 1, [B1024, NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_l4_b1024_v4_32_dots', 'configs/sit_xl.py', 'v4:2x2x4', 1,
     [B1024, '--config.model.remat=dots_saveable', NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_uc16_b1024_v5e64_fsdp4', 'configs/sit_xl.py', 'v5e:8x8', 1,
     [B1024, *UC16, '--config.mesh.fsdp=4',
      NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_l4_b1024_v4_32_fsdp4_full', 'configs/sit_xl.py', 'v4:2x2x4', 1,
     [B1024, '--config.mesh.fsdp=4', '--config.model.remat=full', NO_SAMPLER, SINGLES_ONLY]),
    # The other variants on the pods (2026-12-02 session): GroupDiff-f-4, DiT-XL/2 and UC16 beyond v5e-64.
    ('sit_xl_uc16_b256_v5e64_fsdp4', 'configs/sit_xl.py', 'v5e:8x8', 1,
     [AG, *UC16, '--config.mesh.fsdp=4',
      NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_f4_b1024_v5e64_fsdp8', 'configs/sit_xl.py', 'v5e:8x8', 1,
     [B1024, F4, '--config.mesh.fsdp=8', NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b1024_v5e64_fsdp8', 'configs/dit_xl.py', 'v5e:8x8', 1,
     [B1024, '--config.mesh.fsdp=8', NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_uc16_b1024_v5p64', 'configs/sit_xl.py', 'v5p:4x4x2', 1,
     [B1024, *UC16, NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_f4_b256_v5p64', 'configs/sit_xl.py', 'v5p:4x4x2', 1,
     [F4, NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b256_v5p64', 'configs/dit_xl.py', 'v5p:4x4x2', 1, [NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_f4_b256_v6e64', 'configs/sit_xl.py', 'v6e:8x8', 1,
     [F4, NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b1024_v6e64', 'configs/dit_xl.py', 'v6e:8x8', 1, [B1024, NO_SAMPLER, SINGLES_ONLY]),
    # The rest of the cross product (2026-12-02, second session). First the rows refused before compiling
    # (their groups cannot be split over the devices), then the compiled ones, with the recommended mesh of
    # configs/pod_meshes.py for their pod and batch.
    ('sit_xl_uc16_b256_v5p64', 'configs/sit_xl.py', 'v5p:4x4x2', 1, [AG, *UC16, NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_uc16_b256_v6e64', 'configs/sit_xl.py', 'v6e:8x8', 1, [AG, *UC16, NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_uc16_b256_v5e256', 'configs/sit_xl.py', 'v5e:16x16', 1, [AG, *UC16, NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_uc16_b256_v5p256', 'configs/sit_xl.py', 'v5p:4x4x8', 1, [AG, *UC16, NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_uc16_b1024_v5e256', 'configs/sit_xl.py', 'v5e:16x16', 1, [AG, B1024, *UC16, NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_uc16_b1024_v5p256', 'configs/sit_xl.py', 'v5p:4x4x8', 1, [AG, B1024, *UC16, NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_f4_b256_v5e256', 'configs/sit_xl.py', 'v5e:16x16', 1, [AG, F4, NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_f4_b256_v5p256', 'configs/sit_xl.py', 'v5p:4x4x8', 1, [AG, F4, NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b256_v5e256', 'configs/dit_xl.py', 'v5e:16x16', 1, [AG, NO_SAMPLER]),  # mesh.group=0: groups over 4
    ('dit_xl_l4_b256_v5p256', 'configs/dit_xl.py', 'v5p:4x4x8', 1, [AG, NO_SAMPLER]),  # mesh.group=0: groups over 2
    ('sit_xl_f4_b1024_v5p64', 'configs/sit_xl.py', 'v5p:4x4x2', 1, [B1024, F4, NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b1024_v5p64', 'configs/dit_xl.py', 'v5p:4x4x2', 1, [B1024, NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_uc16_b1024_v6e64', 'configs/sit_xl.py', 'v6e:8x8', 1, [B1024, *UC16, NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_uc16_b1024_v4_32_fsdp4_full', 'configs/sit_xl.py', 'v4:2x2x4', 1,
     [B1024, *UC16, '--config.mesh.fsdp=4', '--config.model.remat=full', NO_SAMPLER, GROUPS_ONLY]),
    ('sit_xl_f4_b256_v4_32', 'configs/sit_xl.py', 'v4:2x2x4', 1, [F4, NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b256_v4_32', 'configs/dit_xl.py', 'v4:2x2x4', 1, [NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b256_v6e64', 'configs/dit_xl.py', 'v6e:8x8', 1, [NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_f4_b1024_v6e64', 'configs/sit_xl.py', 'v6e:8x8', 1, [B1024, F4, NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_f4_b1024_v5p256', 'configs/sit_xl.py', 'v5p:4x4x8', 1, [B1024, F4, NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b1024_v5p256', 'configs/dit_xl.py', 'v5p:4x4x8', 1, [B1024, NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_f4_b1024_v5e256_fsdp4', 'configs/sit_xl.py', 'v5e:16x16', 1,
     [B1024, F4, '--config.mesh.fsdp=4', NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b1024_v5e256_fsdp4', 'configs/dit_xl.py', 'v5e:16x16', 1,
     [B1024, '--config.mesh.fsdp=4', NO_SAMPLER, SINGLES_ONLY]),
    ('sit_xl_f4_b1024_v4_32_fsdp4_full', 'configs/sit_xl.py', 'v4:2x2x4', 1,
     [B1024, F4, '--config.mesh.fsdp=4', '--config.model.remat=full', NO_SAMPLER, SINGLES_ONLY]),
    ('dit_xl_l4_b1024_v4_32_fsdp4_full', 'configs/dit_xl.py', 'v4:2x2x4', 1,
     [B1024, '--config.mesh.fsdp=4', '--config.model.remat=full', NO_SAMPLER, SINGLES_ONLY]),
)


def run(out_dir, only=None):
  """Compiles each row not yet done (a report, or a log ending in the refusal) in a subprocess of its own."""
  only = only.split(',') if isinstance(only, str) else only
  for name, config, topology, slices, extra in ROWS:
    if only and name not in only:
      continue
    workdir = os.path.join(out_dir, name)
    if os.path.exists(os.path.join(workdir, 'compile_report.json')) or _refusal(workdir):
      continue
    os.makedirs(workdir, exist_ok=True)
    print(f'{name}: compiling ...', flush=True)
    with open(os.path.join(workdir, 'log.txt'), 'w') as log:
      subprocess.run([sys.executable, '-m', 'groupdiff_jax.main', f'--config={config}', f'--workdir={workdir}',
                      '--mode=compile', f'--config.compile.topology={topology}',
                      f'--config.compile.num_slices={slices}', *extra], cwd=ROOT, stdout=log, stderr=log,
                     env={'ALLOW_MULTIPLE_LIBTPU_LOAD': '1', **os.environ, 'PYTHONPATH': ROOT}, check=False)
    print(f'{name}: {_refusal(workdir) or "report written"}', flush=True)


def _refusal(workdir):
  """The one-line error of a row refused before compiling (log's `Error:` line), else None."""
  path = os.path.join(workdir, 'log.txt')
  if os.path.exists(path) and not os.path.exists(os.path.join(workdir, 'compile_report.json')):
    errors_seen = [line.strip() for line in open(path) if line.startswith('Error:')]
    return errors_seen[-1] if errors_seen else None
  return None


def _chip(report):
  """Per-device HBM/peak; v4 reports written before tpu_topology.per_device (no 'devices_per_chip') gave a
  whole chip (2 TensorCores, 2 devices) to each device: halve them (the same rule as per_device)."""
  chip = dict(report['chip'])
  if 'devices_per_chip' not in chip and report['topology'].startswith('v4:'):
    chip = {'hbm_bytes': chip['hbm_bytes'] // 2, 'bf16_flops': chip['bf16_flops'] / 2, 'devices_per_chip': 2}
  return chip


def _label(program, p):
  """The program's name; GroupDiff-f's conditional step (kind 'singles', of conditional groups) says so."""
  groups = {int(size) for _, size, conditional in p.get('kind', ()) if conditional == 'True' and int(size) > 1}
  return program + ''.join(f' (cond. groups of {size})' for size in sorted(groups))


def _roofline(report, p):
  """(seconds, MFU) by compile_job.ROOFLINE_MODEL from a report's program, with today's chip figures (reports
  written before the roofline had no bandwidths); (None, None) without the fields it needs."""
  needed = ('compiler_flops_per_device', 'compiler_bytes_accessed_per_device', 'analytic_model_flops_per_device',
            'analytic_attention_flops_per_device')
  if not all(k in p for k in needed):
    return None, None
  cores = _chip(report).get('devices_per_chip', 1)
  chip = {k: v / cores for k, v in CHIPS[chip_of(report['topology'])].items()}
  seconds, _ = roofline(p, chip, p['analytic_attention_flops_per_device'])
  return seconds, p['analytic_model_flops_per_device'] / (seconds * chip['bf16_flops'])


OLD_COUNT_MARK = ' (old count)'
OLD_COUNT_NOTE = ('"(old count)": the report was written before compiled_stats counted a chained async collective once '
                  'and a collective in a while loop once per iteration (commit 5ee1f1d): its collective bytes, and '
                  'the roofline built on them, may be too high (chains) or too low (windowed einsum loops); '
                  '`run` the row again for today\'s count.')


def table(out_dir):
  """The markdown fit table, one line per compiled program, in ROWS order; refused and missing rows too."""
  lines = ['| row | topology | mesh (data, fsdp, group) | ZeRO | batch | remat | program | args GiB | temp GiB '
           '| peak GiB | HBM GiB | fits | collectives (ops, GiB) | est. step s | est. MFU | roof. step s '
           '| roof. MFU | compile s |', '|' + '---|' * 18]
  for name, _, topology, slices, _ in ROWS:
    workdir = os.path.join(out_dir, name)
    path = os.path.join(workdir, 'compile_report.json')
    where = f'{topology} x{slices}'
    if not os.path.exists(path):
      refusal = _refusal(workdir)  # refused before compiling: does not run; else not compiled yet: unknown
      verdict, reason = ('no', refusal) if refusal else ('not compiled yet', '')
      lines.append(f'| {name} | {where} | | | | | | | | | | {verdict} | {reason} | | | | | |')
      continue
    report = json.load(open(path))
    chip = _chip(report)
    budget = (1 - report['headroom']) * chip['hbm_bytes']
    mesh = f"{report['mesh']['data']}, {report['mesh']['fsdp']}, {report['mesh'].get('group', 1)}"
    zero = 'yes' if report.get('shard_update') else 'no'
    for program, p in report['programs'].items():
      if program.startswith('forward'):  # compile.breakdown's programs: docs/scaling.md's breakdown table
        continue
      head = (f"| {name} | {where} | {mesh} | {zero} | {report['batch_size']} | {report['remat']} | "
              f"{_label(program, p)} |")
      if 'compiler_refused' in p:
        lines.append(f"{head} | | | {chip['hbm_bytes'] / 2**30:.0f} | no: {p['compiler_refused']} | | | | | | "
                     f"{p['compile_seconds']:.0f} |")
        continue
      m = p['memory_bytes_per_device']
      coll = sum(c['bytes'] for c in p['collectives'].values()) / 2**30
      ops = sum(c['count'] for c in p['collectives'].values())
      est = p.get('estimated_step_seconds (compiler estimate)')
      mfu = p.get('mfu (compiler estimate)')
      roof, roof_mfu = _roofline(report, p) if program.startswith('train_step/') else (None, None)
      old_count = report.get('collective_bytes') != COLLECTIVE_BYTES_RULE
      mark = OLD_COUNT_MARK if old_count else ''
      lines.append(f"{head} {m['argument'] / 2**30:.2f} | {m['temp'] / 2**30:.2f} | {m['peak'] / 2**30:.2f} | "
                   f"{chip['hbm_bytes'] / 2**30:.0f} | {'yes' if m['peak'] <= budget else 'no'} | {ops}, {coll:.2f}{mark} | "
                   f"{'n/a' if est is None else f'{est:.3f}'} | {'n/a' if mfu is None else f'{mfu:.0%}'} | "
                   f"{'n/a' if roof is None else f'{roof:.3f}{mark}'} | "
                   f"{'n/a' if roof_mfu is None else f'{roof_mfu:.0%}{mark}'} | {p['compile_seconds']:.0f} |")
  print('\n'.join(lines + ['', OLD_COUNT_NOTE]))


if __name__ == '__main__':
  {'run': run, 'table': table}[sys.argv[1]](sys.argv[2], *sys.argv[3:])
