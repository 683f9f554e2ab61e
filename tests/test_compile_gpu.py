"""--mode=compile for GPUs without one (gpu_topology.py): topology names, the target description, the missing
plugin's message, and (where the CUDA plugin and cuDNN are installed: `pip install -e '.[gpu-compile]'`) the
group-split train step compiled by XLA's GPU compiler with cuDNN flash attention."""

import importlib.util
import os
import re
import sys

import pytest

from configs import digits
from groupdiff_jax import compile_job, compile_target, describe, errors, gpu_topology
from tests import cli_in_process
from tests.test_compile_job import production_optimisation  # noqa: F401  (the programs compile as for a run)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_PLUGIN = all(importlib.util.find_spec(m) is not None for m in ('jax_cuda12_plugin', 'nvidia.cudnn'))
FMHA = re.compile(r'\((bf16\[[\d,]+\])[^)]*\) custom-call\((%[^)]*)\), custom_call_target="__cudnn\$fmhaSoftmax"')


@pytest.mark.parametrize('name, parsed', [('h100:8', ('h100', 1, 8)), ('h100:4x8', ('h100', 4, 8)),
                                          ('h200:2', ('h200', 1, 2)), ('v5p:2x2x2', None), ('v5e:8x8', None),
                                          ('a100:8', None), ('h100', None), ('', None)])
def test_gpu_topology_names(name, parsed):
  assert gpu_topology.parse(name) == parsed


def test_the_target_description_carries_the_chip_table():
  for gpu, chip in gpu_topology.GPUS.items():
    text = gpu_topology.target_config(gpu)
    assert f'device_memory_size: {chip["hbm_bytes"]}\n' in text
    assert f'memory_bandwidth: {int(chip["hbm_bandwidth"])}\n' in text
    assert 'cuda_compute_capability { major: 9 minor: 0 }' in text and f'"{chip["device_kind"]}"' in text
    assert gpu_topology.per_device(gpu)['hbm_bytes'] == chip['hbm_bytes']


def test_a_gpu_compile_without_the_plugin_names_the_install(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(sys.modules, 'jax_cuda12_plugin', None)  # import fails as if not installed
  with pytest.raises(errors.ConfigError, match=re.escape(gpu_topology.PIP_GPU_COMPILE)):
    gpu_topology.abstract_devices('h100:8')
  code, _, stderr = cli_in_process.run_main(capsys, f'--config={ROOT}/configs/digits.py', f'--workdir={tmp_path}',
                                            '--mode=compile', '--config.compile.topology=h100:8')
  assert code == 2 and 'gpu-compile' in stderr and 'Traceback' not in stderr, stderr[-2000:]


def test_a_plugin_that_refuses_the_topology_is_one_message(monkeypatch):
  import types  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  for name in ('jax_cuda12_plugin', 'nvidia', 'nvidia.cudnn'):  # installed, as far as the import goes
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
  monkeypatch.setattr(sys.modules['nvidia'], 'cudnn', sys.modules['nvidia.cudnn'], raising=False)

  def refuse(*args, **kwargs):
    raise RuntimeError('INTERNAL: plugin version mismatch\nmore')

  monkeypatch.setattr(topologies, 'get_topology_desc', refuse)
  with pytest.raises(errors.ConfigError, match=r"refused compile.topology='h100:8' \(INTERNAL: plugin version "
                                               r"mismatch\).*gpu-compile"):
    gpu_topology.abstract_devices('h100:8')


@pytest.mark.parametrize('topology, forms', [('h100:8x', ('v5e:2x2', 'h100:8')), ('v5p-8', ('v5e:2x2', 'h100:8')),
                                             ('h100:0', ('h100:8',))])
def test_bad_names_list_the_accepted_forms(topology, forms):
  config = digits.get_config()
  config.compile.topology = topology
  with pytest.raises(errors.ConfigError) as error:
    compile_target.target_devices(config.compile)
  assert all(f'e.g. {form}' in str(error.value) for form in forms), error.value


@pytest.mark.parametrize('fields, named', [({'num_slices': 2}, 'compile.num_slices=2'),
                                           ({'breakdown': True}, 'compile.breakdown=True')])
def test_tpu_only_compile_fields_are_refused_for_gpus(fields, named):
  config = digits.get_config()
  config.compile.update(topology='h100:8', **fields)
  with pytest.raises(errors.ConfigError, match=re.escape(named)):
    compile_target.target_devices(config.compile)


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs the CUDA plugin and cuDNN: pip install -e '.[gpu-compile]'")
@pytest.mark.parametrize('collective', ['all_to_all', 'all_gather'])
def test_a_group_split_step_compiles_for_h100_with_cudnn_flash_attention(collective, production_optimisation):
  """SiT-XL's width and heads (16 of 72) at depth 2, groups of 4 over 2 GPUs each (mesh.group=2), ZeRO.

  cuDNN's fused attention runs on this device's queries
  against the whole group's keys (all_gather: [1, 2L] queries, [1, 4L] keys) or on all members with half the
  heads (all_to_all: [1, 4L, H/2, D]); forward and backward kernels both, and the report has memory and
  collectives but no roofline (the GPU compiler gives no cost analysis without a device)."""
  config = digits.get_config()
  config.model.update(depth=2, hidden_size=1152, num_heads=16, dtype='bfloat16', attention_impl='cudnn')
  config.train.update(batch_size=8, mixed_steps=False)
  config.compile.update(topology='h100:4', step_kinds='groups')
  config.mesh.update(data=2, group=2, group_collective=collective, shard_update=True, min_sharded_size=0)
  hlo = {}
  report = compile_job.compile_report(config, include_sampler=False, hlo_sink=hlo.__setitem__)
  step = report['programs']['train_step/groups']
  text = hlo['train_step/groups']
  assert report['device_kind'] == gpu_topology.GPUS['h100']['device_kind'] and report['devices'] == 4
  assert step['per_device_images'] == 2 and step['fits'] and step['memory_bytes_per_device']['peak'] > 0
  assert '__cudnn$fmhaSoftmaxBackward' in text
  outputs = {shape for shape, _ in FMHA.findall(text)}
  assert outputs, 'no cuDNN fused attention in the program'
  dims = [tuple(map(int, re.findall(r'\d+', s)[1:])) for s in outputs]  # [B, H, T, D] (cuDNN's layout)
  heads, head_dim = config.model.num_heads, config.model.hidden_size // config.model.num_heads
  moved = step['collectives']
  if collective == 'all_to_all':  # the 4 members' queries, half the heads
    assert all(d[1] == heads // 2 and d[3] == head_dim for d in dims), dims
    assert moved['all-to-all']['count'] >= 2 * 2 * 4  # q, k, v, out of 2 blocks, forward and backward
  else:  # this GPU's 2 members' queries, every head (keys: all 4 members, gathered)
    assert all(d[1] == heads and d[3] == head_dim for d in dims), dims
    assert moved['all-gather']['count'] > 0 and moved['all-to-all']['count'] <= 1  # (the embedding's own)
  tokens = describe.arch_from_config(config.model).tokens  # L, one image's
  assert {d[2] for d in dims} == {4 * tokens if collective == 'all_to_all' else 2 * tokens}, dims
  assert step['roofline_seconds (estimate)'] is None and step['mfu (roofline estimate)'] is None
  # The sharded update's parameters are gathered in bf16 (train_step.gather_for_compute's barrier; without it
  # XLA's GPU compiler gathered float32 at this width and this assertion failed).
  gathered = re.findall(r'= \(*([a-z0-9]+)\[[^\n]*? all-gather(?:-start)?\(', text)
  assert gathered and 'f32' not in gathered, gathered
