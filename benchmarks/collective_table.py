"""The collectives of one compiled program, op by op, from the HLO that `--mode=compile` saved.

  python -m groupdiff_jax.main --config=configs/sit_xl.py --workdir=DIR --mode=compile \
      --config.compile.topology=v5e:16x16 --config.compile.step_kinds=groups --config.compile.sampler=False \
      --config.compile.save_hlo=True --config.model.depth=2        # a shallow copy compiles in ~30 s
  python benchmarks/collective_table.py DIR/hlo/train_step_groups.txt

One line per (collective, result shape, replica groups, jax op): how many times it runs per step, and the
bytes it moves per device in all, counted as compiled_stats.collectives counts them (a TPU async collective
split over several fusions once, a collective in a while loop once per iteration); the total per collective
kind at the end, equal to the report's `collectives`.
"""

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from groupdiff_jax.compiled_stats import collective_instructions  # noqa: E402  pylint: disable=wrong-import-position


def table(hlo_text):
  """The lines of the table for one program's HLO text, largest bytes first."""
  runs, moved, totals = collections.Counter(), collections.Counter(), collections.Counter()
  for c in collective_instructions(hlo_text):
    key = (c['op'], c['result'], c['replica_groups'], c['op_name'].replace('jit(train_step)/', ''))
    runs[key] += c['runs']
    moved[key] += c['bytes'] * c['runs']
    totals[c['op']] += c['bytes'] * c['runs']
  lines = ['| runs | MiB | collective | result | replica groups | jax op |', '|---|---|---|---|---|---|']
  for key in sorted(runs, key=lambda k: -moved[k]):
    op, result, groups, op_name = key
    lines.append(f'| {runs[key]} | {moved[key] / 2**20:.1f} | {op} | {result[:60]} | {groups[:50]} | {op_name} |')
  lines.append('')
  lines.append('total: ' + ', '.join(f'{op} {b / 2**30:.3f} GiB' for op, b in sorted(totals.items())))
  return lines


def main(argv):
  if len(argv) != 2:
    print(f'usage: python {argv[0]} HLO_TEXT_FILE  (written by --config.compile.save_hlo=True)', file=sys.stderr)
    return 2
  if not os.path.isfile(argv[1]):
    print(f'Error: {argv[1]} is not a file; run --mode=compile with --config.compile.save_hlo=True first '
          '(it writes DIR/hlo/<program>.txt).', file=sys.stderr)
    return 2
  with open(argv[1]) as f:
    print('\n'.join(table(f.read())))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
