"""benchmarks/collective_table.py: a program's collectives op by op, from hand-made HLO text (no compiling)."""

from groupdiff_jax import compiled_stats
from tests import benchmark_module

HLO = '\n'.join([
    'HloModule m',
    '',
    'ENTRY %main (a: bf16[4]) -> bf16[8] {',
    '  %a = bf16[4]{0} parameter(0)',
    '  %g1 = bf16[8]{0} all-gather(%a), replica_groups={{0,1}}, frontend_attributes={chain_id="3"}, '
    'metadata={op_name="jit(train_step)/jvp(DiT)/blocks_0/attn/all_gather"}',
    '  %g2 = bf16[8]{0} all-gather(%a), replica_groups={{0,1}}, frontend_attributes={chain_id="3"}, '
    'metadata={op_name="jit(train_step)/jvp(DiT)/blocks_0/attn/all_gather"}',
    '  ROOT %r = f32[8]{0} all-reduce(%g1), replica_groups={{0,1}}, metadata={op_name="jit(train_step)/psum"}',
    '}',
])


def collective_table():
  return benchmark_module.load('collective_table')


def test_one_line_per_collective_and_totals_equal_to_the_report_count():
  lines = collective_table().table(HLO)
  rows = [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:] if line.startswith('|')]
  # Largest first: the f32 all-reduce (32 bytes), then the chained all-gather, listed once (16 bytes).
  assert [r[:4] for r in rows] == [['1', '0.0', 'all-reduce', 'f32[8]'], ['1', '0.0', 'all-gather', 'bf16[8]']]
  assert rows[1][5] == 'jvp(DiT)/blocks_0/attn/all_gather' and rows[0][5] == 'psum'
  counted = compiled_stats.collectives(HLO)
  assert counted['all-gather'] == {'count': 1, 'bytes': 16} and counted['all-reduce'] == {'count': 1, 'bytes': 32}
  assert lines[-1] == 'total: all-gather 0.000 GiB, all-reduce 0.000 GiB'


def test_a_missing_file_is_one_error_and_exit_2(capsys):
  assert collective_table().main(['collective_table.py', '/no/such/file.txt']) == 2
  err = capsys.readouterr().err
  assert 'save_hlo=True' in err and 'Traceback' not in err
