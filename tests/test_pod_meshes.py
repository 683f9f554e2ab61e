"""configs/pod_meshes.py against the compiler's own reports (benchmarks/fit_reports/, benchmarks/fit_table.py)."""

import glob
import json
import os

import pytest

from configs import pod_meshes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def official_recipe_reports():
  """compile_report.json of every SiT-XL/2 GroupDiff-l-4 single-slice row that compiled."""
  reports = []
  for path in glob.glob(os.path.join(ROOT, 'benchmarks', 'fit_reports', 'sit_xl_l4_*', 'compile_report.json')):
    with open(path) as f:
      report = json.load(f)
    if report['num_slices'] == 1:
      reports.append(report)
  return reports


@pytest.mark.parametrize('key', sorted(pod_meshes.RECOMMENDED))
def test_every_recommended_mesh_is_one_the_compiler_said_fits(key):
  accelerator, batch = key
  entry = pod_meshes.RECOMMENDED[key]
  topology = pod_meshes.TOPOLOGIES[accelerator]
  same = [r for r in official_recipe_reports() if r['topology'] == topology and r['batch_size'] == batch]
  if isinstance(entry, str):
    # No mesh the compiler was given fits (or, for 'cannot run', none could be built: next test).
    assert not any(r['fits'] for r in same)
  else:
    fsdp, remat = entry
    match = [r for r in same if r['mesh']['fsdp'] == fsdp and r['remat'] == remat]
    assert match and all(r['fits'] for r in match), (key, [(r['mesh'], r['fits']) for r in same])


def test_pods_without_an_entry_split_the_official_groups_over_devices():
  # Batch 256 = 64 groups of 4 on v5e-256 (256 devices) and v5p-256 (128): no preset; mesh.group=0 (the
  # default) splits each group over 4 and 2 devices so that 64 data shards hold whole groups.
  from groupdiff_jax import sharding, step_plan  # pylint: disable=import-outside-toplevel
  kinds = step_plan.step_kinds(256, 4, 0.1, mixed_steps=False).values()
  for accelerator, devices, split in (('v5e-256', 256, 4), ('v5p-256', 128, 2)):
    assert pod_meshes.mesh_flags(accelerator, 256) == []
    assert sharding.auto_group(kinds, devices) == split


def test_flags_and_errors():
  assert pod_meshes.mesh_flags('v5e-64', '1024') == ['--config.mesh.data=-1', '--config.mesh.fsdp=1']
  assert pod_meshes.mesh_flags('v4-32', 1024) == ['--config.mesh.data=-1', '--config.mesh.fsdp=1']
  assert pod_meshes.mesh_flags('v4-32', 1024, table={('v4-32', 1024): (4, 'full')}) == [
      '--config.mesh.data=-1', '--config.mesh.fsdp=4', '--config.model.remat=full']
  assert pod_meshes.mesh_flags('v5p-8', 256) == []
  with pytest.raises(pod_meshes.NoMesh, match='no mesh'):
    pod_meshes.mesh_flags('v5p-256', 256, table={('v5p-256', 256): 'no mesh fits'})
  assert pod_meshes.main(['pod_meshes.py', 'v5e-64', 'x']) == 2
