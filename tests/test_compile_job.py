"""--mode=compile: the real train steps and sampler compiled for an abstract TPU topology (libtpu, no TPU)."""

import json
import os
import re

import jax
import pytest
from jax.experimental import mesh_utils

from configs import default, digits, sit_xl
from groupdiff_jax import compile_job, compiled_stats, describe, errors, sharding, step_breakdown, tpu_topology
from tests import cli_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mesh_config(**fields):
  mesh = default.get_config().mesh
  mesh.update(fields)
  return mesh


@pytest.fixture(autouse=True)
def production_optimisation():
  """The TPU programs compile as they would for a run (the suite's CPU programs compile at optimisation level 0:
  conftest.py), so the compiler's memory and collectives are the ones a run gets."""
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', before)


def tiny_config(attention_impl='splash', batch_size=32, topology='v5e:2x2'):
  config = digits.get_config()
  config.model.depth = 2
  config.model.hidden_size = 128
  config.model.num_heads = 2
  config.model.dtype = 'bfloat16'
  config.model.attention_impl = attention_impl
  config.train.batch_size = batch_size
  config.train.mixed_steps = False  # the alternating kinds: a singles and a groups program
  config.compile.topology = topology
  config.sample.groups_per_batch = 4
  config.sample.num_steps = 2
  return config


@pytest.mark.long
@pytest.mark.parametrize('impl', ['splash', 'auto'])
def test_compiles_for_v5e_with_mosaic_kernels_and_local_group_attention(impl):
  config = tiny_config(impl)
  config.mesh.shard_update = False  # replicated parameters: any gather would move activations
  report = compile_job.compile_report(config)
  assert report['devices'] == 4 and report['mesh'] == {'data': 4, 'fsdp': 1, 'group': 1}
  assert report['device_kind'].startswith('TPU v5')
  steps = {k: v for k, v in report['programs'].items() if k.startswith('train_step/')}
  assert set(steps) == {'train_step/singles', 'train_step/groups'} and 'sample' in report['programs']
  for program in report['programs'].values():
    memory = program['memory_bytes_per_device']
    assert set(memory) == {'argument', 'output', 'temp', 'alias', 'generated_code', 'peak'}
    assert memory['argument'] > 0 and program['compile_seconds'] > 0
    assert set(program['collectives']) == set(compiled_stats.COLLECTIVES)
    # The splash kernel is a Mosaic custom call (chosen for TPU, not for the CPU host), in every program.
    assert program['mosaic_kernels'] > 0
    assert program['fits'] is True and program['hbm_bytes'] == 16 * 2**30
  for step in steps.values():
    # fsdp=1: parameters replicated, so only gradient all-reduces; nothing moves activations around attention.
    assert step['collectives']['all-reduce']['count'] > 0
    for op in ('all-gather', 'all-to-all', 'collective-permute'):
      assert step['collectives'][op]['count'] == 0
    # 2 blocks x (forward, backward dq, backward dkv) splash kernels.
    assert step['mosaic_kernels'] >= 2 * 3
  assert report['batch_local_attention'] is True and report['fits'] is True
  # The state (params, EMA, Adam mu and nu: float32) is the argument, within 10% of describe's count.
  est = report['describe_estimate_bytes_per_device']
  state = est['params'] + est['ema_params'] + est['opt_state']
  argument = steps['train_step/singles']['memory_bytes_per_device']['argument']
  assert abs(argument - state) <= 0.1 * state, (argument, state)


@pytest.mark.long
def test_xla_attention_has_no_mosaic_kernel_and_nothing_enters_a_persistent_cache(tmp_path):
  import jax
  from jax.experimental.compilation_cache import compilation_cache as jax_cache
  # A cache of our own that would keep every executable (the suite's is shared by other workers).
  names = {'jax_compilation_cache_dir': str(tmp_path / 'cache'), 'jax_persistent_cache_min_compile_time_secs': 0.0,
           'jax_persistent_cache_min_entry_size_bytes': 0, 'jax_enable_compilation_cache': True}
  previous = {name: getattr(jax.config, name) for name in names}
  for name, value in names.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()
  try:
    report = compile_job.compile_report(tiny_config('xla'), include_sampler=False)
    # Executables of abstract TPU devices cannot be read back on this host: the job keeps them out of the cache
    # (without the guard: one jit_train_step entry per step kind; host programs such as PRNGKey may enter).
    entries = os.listdir(tmp_path / 'cache') if (tmp_path / 'cache').exists() else []
    assert not [e for e in entries if e.startswith('jit_train_step')], entries
    assert jax.config.jax_enable_compilation_cache is True  # restored for what runs after
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    jax_cache.reset_cache()
  assert all(p['mosaic_kernels'] == 0 for p in report['programs'].values())
  assert all(p['compiler_flops_per_device'] > 0 for p in report['programs'].values())


@pytest.mark.long
def test_a_4096_image_batch_does_not_fit_v5e_2x2_and_says_by_how_much(tmp_path):
  config = tiny_config('splash', batch_size=4096)
  config.model.variant = 'SiT-S/2'  # 32x32 inputs in 2x2 patches: 256 tokens per image, as SiT/2 on ImageNet
  config.model.input_size = 32
  config.model.depth = 4
  config.model.hidden_size = 768
  config.model.num_heads = 6
  config.compile.step_kinds = 'groups'  # the largest program alone: one compile instead of three
  config.compile.sampler = False
  config.compile.precheck_ratio = 0.0  # the compiler's verdict, not describe's precheck
  # Refused by the TPU compiler itself (temporaries over the chip's HBM) or by the headroom verdict: either
  # way one ConfigError with the per-device bytes, the HBM and what to change.
  with pytest.raises(errors.ConfigError, match=r'does not fit.*\d+\.\d+G.*HBM') as info:
    compile_job.run(config, str(tmp_path))
  assert 'remat' in str(info.value) and 'batch_size' in str(info.value)
  # The report is written all the same (the fit table's "does not fit" rows), the refused or oversized program marked.
  report = json.load(open(tmp_path / 'compile_report.json'))
  assert list(report['programs']) == ['train_step/groups']
  assert not report['fits'] and any(not p['fits'] for p in report['programs'].values())
  # Sharding the state is advised exactly when it could help: the step was refused (state bytes unknown) or
  # its arguments (the state) take over 30% of the budget.
  program = report['programs']['train_step/groups']
  budget = (1 - report['headroom']) * report['chip']['hbm_bytes']
  state_matters = 'compiler_refused' in program or program['memory_bytes_per_device']['argument'] > 0.3 * budget
  assert ('--config.mesh.fsdp' in str(info.value)) == state_matters


def test_sit_xl_far_over_hbm_is_refused_from_describe_before_anything_is_compiled(monkeypatch, tmp_path):
  def no_compile(*args, **kwargs):
    raise AssertionError('compiled although describe put it far over HBM')

  monkeypatch.setattr(compile_job, 'compile_all', no_compile)
  config = sit_xl.get_config()
  config.compile.topology = 'v5e:2x2'
  config.train.batch_size = 4096
  with pytest.raises(errors.ConfigError) as info:
    compile_job.run(config, str(tmp_path))
  message = str(info.value)
  # 4096 images over 4 devices; a v5e device has 16 GiB, 14.40 GiB of it with the default 10% headroom.
  assert 'train.batch_size=4096 on 4 devices' in message and 'for 1024 images per device' in message
  assert '14.40G' in message and '16.00G HBM' in message and 'not compiled' in message
  estimate = float(re.search(r'estimates (\d+\.\d+)G per device', message).group(1))
  assert estimate > 2 * 14.40
  assert 'remat' in message and 'train.batch_size)' in message and 'precheck_ratio=0' in message
  assert not (tmp_path / 'compile_report.json').exists()


def test_the_precheck_lets_the_official_recipe_through_to_the_compiler():
  # SiT-XL/2 at batch 256 on v5p:2x2x2 fits (the fit table's compiled rows): the precheck must not refuse it.
  config = sit_xl.get_config()
  config.compile.topology = 'v5p:2x2x2'
  devices = tpu_topology.abstract_devices(config.compile.topology)
  chip = tpu_topology.per_device(tpu_topology.CHIPS['v5p'], devices)
  mesh = tpu_topology.target_mesh(config, devices, 1)
  estimate = describe.describe(config, mesh=mesh, cost_analysis=False)
  compile_job.precheck(config, estimate, 0.9 * chip['hbm_bytes'], chip, mesh)
  # The same estimate against a budget under half of it is refused, and ratio 0 turns the check off.
  total = estimate['memory_bytes_per_device']['total']
  with pytest.raises(errors.ConfigError, match='not compiled'):
    compile_job.precheck(config, estimate, 0.49 * total, chip, mesh)
  config.compile.precheck_ratio = 0.0
  compile_job.precheck(config, estimate, 0.49 * total, chip, mesh)


def test_fit_advice_names_the_bytes_and_the_remedies():
  report = {'programs': {'train_step/groups': {'memory_bytes_per_device': {'peak': 20 * 2**30, 'argument': 8 * 2**30,
                                                                          'temp': 12 * 2**30}}},
            'headroom': 0.1, 'chip': {'hbm_bytes': 16 * 2**30}, 'topology': 'v5e:2x2', 'mesh': {'data': 4, 'fsdp': 1},
            'devices': 4, 'remat': 'none'}
  advice = compile_job.fit_advice(report)
  assert '20.00G per device' in advice and '16.00G HBM' in advice and '14.40G' in advice
  assert 'fsdp' in advice and 'remat' in advice and 'batch_size' in advice


@pytest.mark.parametrize('topology', ['v5e-2x2', 'v7x:2x2', 'tpu', ''])
def test_unknown_topology_names_the_accepted_form(topology):
  with pytest.raises(errors.ConfigError, match='e.g. v5e:2x2'):
    tpu_topology.abstract_devices(topology)


def test_mesh_and_batch_that_do_not_match_the_topology_are_refused_before_compiling():
  config = tiny_config()
  config.mesh.data = 8
  with pytest.raises(errors.ConfigError, match='4 devices'):
    compile_job.compile_report(config)
  config = tiny_config(batch_size=36)  # groups of 4 (10% of 36 -> 1 group) cannot split over 4 devices
  with pytest.raises(errors.ConfigError, match='batch_size=36'):
    compile_job.compile_report(config)
  config = tiny_config()
  config.mesh.dcn_data = 2
  with pytest.raises(errors.ConfigError, match='num_slices=1'):
    compile_job.compile_report(config)


@pytest.mark.long
def test_two_slices_compile_with_dcn_data():
  config = tiny_config(batch_size=64)
  config.compile.num_slices = 2
  config.mesh.dcn_data = 2
  report = compile_job.compile_report(config, include_sampler=False)
  assert report['devices'] == 8 and report['mesh'] == {'data': 8, 'fsdp': 1, 'group': 1}
  assert all(p['mosaic_kernels'] > 0 for p in report['programs'].values())


def test_main_compile_mode_bad_topology_exits_2(tmp_path, capsys):
  code, _, stderr = cli_in_process.run_main(capsys, f'--config={ROOT}/configs/digits.py', f'--workdir={tmp_path}',
                                            '--mode=compile', '--config.compile.topology=v5e-8')
  assert code == 2, stderr[-2000:]
  assert 'compile.topology' in stderr and 'Traceback' not in stderr


def test_collective_bytes_sum_combined_tuples_and_take_the_moved_half_of_async_starts():
  hlo = '\n'.join([
      '  %ar = (f32[10]{0}, bf16[4,2]{1,0}) all-reduce(f32[10]{0} %a, bf16[4,2]{1,0} %b), replica_groups={}',
      '  %ag = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %c), dimensions={0}',
      '  %x = f32[3]{0} add(f32[3]{0} %d, f32[3]{0} %e)',
  ])
  found = compiled_stats.collectives(hlo)
  assert found['all-reduce'] == {'count': 1, 'bytes': 10 * 4 + 8 * 2}
  assert found['all-gather'] == {'count': 1, 'bytes': 8 * 4}
  assert found['reduce-scatter'] == {'count': 0, 'bytes': 0}


def test_a_chained_async_collective_counts_once():
  # The TPU's async collective fusion: one all-gather as a start, a continuation and a done fusion, each
  # holding a copy of the instruction with the chain's id (text as libtpu 0.0.42 writes it, shortened).
  piece = ('  %all-gather.{n} = bf16[256,18,1152]{{2,1,0}} all-gather(%param_0.{n}), channel_id=19, '
           'dimensions={{0}}, frontend_attributes={{chain_id="{chain}"}}, metadata={{op_name="convert"}}')
  hlo = '\n'.join([piece.format(n=1, chain=1), piece.format(n=2, chain=1), piece.format(n=3, chain=1),
                   piece.format(n=4, chain=2),
                   '  %ar = bf16[8]{0} all-reduce(bf16[8]{0} %g), frontend_attributes={chain_id="1"}'])
  found = compiled_stats.collectives(hlo)
  assert found['all-gather'] == {'count': 2, 'bytes': 2 * 256 * 18 * 1152 * 2}
  assert found['all-reduce'] == {'count': 1, 'bytes': 8 * 2}  # keyed by kind too


def test_a_collective_in_a_while_loop_counts_once_per_iteration():
  # A windowed einsum as libtpu 0.0.42 writes it (shortened): counter from copy(0) by 2 while < 16 = 8 trips.
  hlo = '\n'.join([
      'HloModule m',
      '',
      '%cond (p: (bf16[4], u32[])) -> pred[] {',
      '  %p = (bf16[4]{0}, u32[]{:T(128)}) parameter(0)',
      '  %i = u32[]{:T(128)} get-tuple-element(%p), index=1',
      '  %bound = u32[]{:T(128)} constant(16)',
      '  ROOT %lt = pred[]{:T(512)} compare(%i, %bound), direction=LT',
      '}',
      '',
      '%body (q: (bf16[4], u32[])) -> (bf16[4], u32[]) {',
      '  %q = (bf16[4]{0}, u32[]{:T(128)}) parameter(0)',
      '  %x = bf16[4]{0} get-tuple-element(%q), index=0',
      '  %cp = (bf16[4]{0}, bf16[4]{0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%x), channel_id=1',
      '  %j = u32[]{:T(128)} get-tuple-element(%q), index=1',
      '  %two = u32[]{:T(128)} constant(2)',
      '  %next = u32[]{:T(128)} add(%j, %two)',
      '  ROOT %t = (bf16[4]{0}, u32[]{:T(128)}) tuple(%x, %next)',
      '}',
      '',
      'ENTRY %main (a: bf16[4]) -> bf16[4] {',
      '  %a = bf16[4]{0} parameter(0)',
      '  %zero = u32[]{:T(128)} constant(0)',
      '  %start = u32[]{:T(128)} copy(%zero)',
      '  %init = (bf16[4]{0}, u32[]{:T(128)}) tuple(%a, %start)',
      '  %w = (bf16[4]{0}, u32[]{:T(128)}) while(%init), condition=%cond, body=%body',
      '  %ag = bf16[8]{0} all-gather(%a), dimensions={0}',
      '  ROOT %r = bf16[4]{0} get-tuple-element(%w), index=0',
      '}',
  ])
  found = compiled_stats.collectives(hlo)
  assert found['collective-permute'] == {'count': 8, 'bytes': 8 * 4 * 2}
  assert found['all-gather'] == {'count': 1, 'bytes': 8 * 2}
  known = hlo.replace('body=%body', 'body=%body, backend_config={"known_trip_count":{"n":"3"}}')
  assert compiled_stats.collectives(known)['collective-permute']['count'] == 3


def test_step_kinds_selects_the_programs_and_names_the_ones_a_config_runs():
  kinds = {'singles': 'S', 'groups': 'G'}
  assert compile_job.selected_kinds(kinds, '') == kinds
  assert compile_job.selected_kinds(kinds, 'groups') == {'groups': 'G'}
  assert list(compile_job.selected_kinds(kinds, 'groups, singles')) == ['singles', 'groups']
  with pytest.raises(errors.ConfigError, match=r"\['mixed'\].*\['singles', 'groups'\]"):
    compile_job.selected_kinds(kinds, 'mixed')


def test_a_v4_chip_shows_as_two_devices_that_share_its_hbm_and_peak():
  devices = tpu_topology.abstract_devices('v4:2x2x2')  # 8 chips, 2 TensorCores each
  assert len(devices) == 16
  chip = tpu_topology.per_device(tpu_topology.CHIPS['v4'], devices)
  assert chip == {'hbm_bytes': 16 * 2**30, 'bf16_flops': 137.5e12, 'hbm_bandwidth': 600e9,
                  'ici_bandwidth': 1.1e15 / 4096 / 2, 'devices_per_chip': 2}
  v5e = tpu_topology.abstract_devices('v5e:2x2')
  assert tpu_topology.per_device(tpu_topology.CHIPS['v5e'], v5e)['hbm_bytes'] == 16 * 2**30


def test_meshes_follow_the_chips_where_jax_can_lay_them_out_and_keep_the_listed_order_elsewhere():
  def ids(mesh):
    return [d.id for d in mesh.devices.flat]

  v5p = tpu_topology.abstract_devices('v5p:2x2x2')  # a 2x2x2 cuboid, one device per chip: jax's torus layout
  torus = [d.id for d in mesh_utils.create_device_mesh((4, 2), v5p).flat]
  assert ids(sharding.make_mesh(mesh_config(data=4, fsdp=2), v5p)) == torus != [d.id for d in v5p]
  # Listed (row-major) order where jax cannot lay them out: both TensorCores of a v4 chip listed as devices,
  # 3 of 4 chips (no cuboid), fsdp=4 on an 8x8 slice (4 is no product of the physical axes 8, 8).
  for devices, fsdp in [(tpu_topology.abstract_devices('v4:2x2x2'), 2), (tpu_topology.abstract_devices('v5e:2x2')[:3], 1),
                        (tpu_topology.abstract_devices('v5e:8x8'), 4)]:
    assert ids(sharding.make_mesh(mesh_config(data=-1, fsdp=fsdp), devices)) == [d.id for d in devices]


@pytest.mark.long  # a TPU-topology compile, as the others above: .ci/run's second step
def test_a_group_split_over_devices_and_a_sharded_update_compile_for_tpu():
  """Groups of 4 over 2 devices each (mesh.group=2) with splash, ZeRO: the groups step exchanges heads for
  members over the group axis (all_to_all, the default), and the state per device shrinks by the data x
  group size; the report gives a roofline estimate beside the compiler's."""
  config = tiny_config('splash', batch_size=8, topology='v5e:2x2')
  config.compile.step_kinds = 'groups'
  config.compile.breakdown = True
  config.mesh.update(data=2, group=2, shard_update=True, min_sharded_size=0)
  hlo = {}
  report = compile_job.compile_report(config, include_sampler=False, hlo_sink=hlo.__setitem__)
  # The breakdown's programs compiled beside the step: twice the batch reads more, the backward and the
  # update add to the forward, and none of them decides whether the config fits.
  parts = report['hbm_breakdown']['parts']
  assert report['hbm_breakdown']['kind'] == 'groups'
  assert all(parts[k]['bytes'] > 0 for k in ('forward activations', 'backward', 'update'))
  assert {'forward/groups', 'forward_2x/groups', 'forward_backward/groups'} <= set(report['programs'])
  assert report['mesh'] == {'data': 2, 'fsdp': 1, 'group': 2} and report['shard_update'] is True
  step = report['programs']['train_step/groups']
  assert step['per_device_images'] == 2  # 2 groups of 4 over 4 devices: half a group each
  # q, k, v and the output cross the group axis by all-to-all; the parameters of the sharded update are
  # all-gathered (libtpu lowers the gradients' reduction its own way, so that is not asserted).
  assert step['collectives']['all-to-all']['count'] > 0 and step['collectives']['all-gather']['count'] > 0
  # The HLO handed to hlo_sink (--config.compile.save_hlo) is the program the report counted.
  assert set(hlo) == set(report['programs'])
  assert compiled_stats.collectives(hlo['train_step/groups']) == step['collectives']
  assert step['mosaic_kernels'] >= 2 * 3
  assert report['batch_local_attention'] is None  # collectives around attention are expected here
  est = report['describe_estimate_bytes_per_device']
  # Params, EMA and Adam state split 4 ways (data 2 x group 2); the model reads a bfloat16 copy of the params
  # gathered once a step (a temporary). The argument follows describe's count.
  assert est['params'] == est['ema_params'] and est['gathered params'] > 0
  argument = step['memory_bytes_per_device']['argument']
  assert abs(argument - (est['params'] + est['ema_params'] + est['opt_state'])) <= 0.1 * argument
  parts = step['roofline_parts_seconds']
  assert set(parts) == {'compute', 'memory', 'collectives', 'attention'} and parts['collectives'] > 0
  assert step['roofline_seconds (estimate)'] == pytest.approx(
      max(parts['compute'], parts['memory']) + parts['collectives'] + parts['attention'])
  assert 0 < step['mfu (roofline estimate)'] < 1


def test_roofline_counts_an_all_reduce_as_a_reduce_scatter_plus_an_all_gather():
  chip = {'bf16_flops': 1e12, 'hbm_bandwidth': 1e9, 'ici_bandwidth': 1e8}
  coll = lambda **ops: {op: {'count': 1 if ops.get(op) else 0, 'bytes': ops.get(op, 0)}
                        for op in compiled_stats.COLLECTIVES}
  result = {'compiler_flops_per_device': 2e12, 'compiler_bytes_accessed_per_device': 3e9,
            'collectives': coll(**{'all-reduce': 1e8, 'all-gather': 5e7})}
  seconds, parts = compile_job.roofline(result, chip, attention_flops=1e12)
  assert parts == {'compute': 2.0, 'memory': 3.0, 'collectives': (2 * 1e8 + 5e7) / 1e8, 'attention': 1.0}
  assert seconds == 3.0 + 2.5 + 1.0
  # The same gradient bytes reduce-scattered and the parameters all-gathered (ZeRO) cost what the all-reduce
  # did.
  zero = dict(result, collectives=coll(**{'reduce-scatter': 1e8, 'all-gather': 1e8 + 5e7}))
  assert compile_job.roofline(zero, chip, 1e12)[1]['collectives'] == parts['collectives']


def test_hbm_breakdown_parts_follow_from_the_programs_bytes():
  gb = 1e9
  programs = {'forward/groups': 10 * gb, 'forward_2x/groups': 16 * gb, 'forward_backward/groups': 30 * gb,
              'train_step/groups': 33 * gb}
  programs = {k: {'compiler_bytes_accessed_per_device': v} for k, v in programs.items()}
  parts = step_breakdown.parts(programs, 'groups', {'hbm_bandwidth': 2 * gb})
  assert {k: p['bytes'] / gb for k, p in parts.items()} == {
      'forward weights': 4, 'forward activations': 6, 'backward': 20, 'update': 3, 'step': 33}
  assert parts['update']['hbm_seconds'] == 1.5
