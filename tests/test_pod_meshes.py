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


def test_cannot_run_entries_follow_from_whole_groups_per_device():
  # 64 groups of 4 at batch 256: a pod with more batch shards than groups cannot hold whole groups.
  for (accelerator, batch), entry in pod_meshes.RECOMMENDED.items():
    if isinstance(entry, str) and entry.startswith('cannot run'):
      chips = {'v5e-256': 256, 'v5p-256': 128}[accelerator]
      assert batch // 4 < chips


def test_flags_and_errors():
  assert pod_meshes.mesh_flags('v5e-64', '1024') == ['--config.mesh.data=-1', '--config.mesh.fsdp=8']
  assert pod_meshes.mesh_flags('v4-32', 1024) == ['--config.mesh.data=-1', '--config.mesh.fsdp=4',
                                                   '--config.model.remat=full']
  assert pod_meshes.mesh_flags('v5p-8', 256) == []
  with pytest.raises(pod_meshes.NoMesh, match='use batch 1024'):
    pod_meshes.mesh_flags('v5p-256', 256)
  assert pod_meshes.main(['pod_meshes.py', 'v5e-64', 'x']) == 2
