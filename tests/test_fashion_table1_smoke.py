"""The Fashion-MNIST study script (experiments/fashion_table1.py) end to end at a tiny size, resumed, reported."""

import json
import os

import numpy as np
import pytest

from experiments import fashion_settings, fashion_table1, sweep_files, table1
from tests.test_fashion_mnist import write_split

# 4 steps, a loss per step and a training state saved at step 2: the baseline run of the sweep is also the
# uninterrupted run that the killed training below must reproduce.
SMOKE = ['--depth=1', '--hidden_size=32', '--batch_size=16', '--num_steps=4', '--log_every=1',
         '--train_checkpoint_every=2', '--sample_steps=2', '--curve_samples=16', '--num_samples=24',
         '--saved_samples=8', '--chunk=16', '--probe_images=8', '--cfg_scales=1,2', '--classifier_epochs=1',
         '--encoder_epochs=1', '--num_neighbors=8', '--neighbour_method=exact', '--seeds=0',
         '--settings=baseline,sim_uc4_stage0.2']


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  """The sweep of SMOKE run once: (data dir, out dir, its common arguments)."""
  tmp_path = tmp_path_factory.mktemp('fashion_sweep')
  data = tmp_path / 'idx'
  data.mkdir()
  write_split(data, 'train', 256)
  write_split(data, 'test', 64, seed=1)
  out, json_path, docs = tmp_path / 'out', tmp_path / 'report.json', tmp_path / 'docs'
  common = [f'--out={out}', f'--data_dir={data}', f'--json={json_path}', f'--docs_dir={docs}'] + SMOKE
  fashion_table1.main(common)
  return data, out, common


def test_sweep_runs_resumes_and_reports(sweep):
  _, out, common = sweep
  json_path, docs = out.parent / 'report.json', out.parent / 'docs'
  runs = out / 'runs'
  names = sorted(n for n in os.listdir(runs) if n.endswith('.json'))
  # sim_uc4 is trained for the Table 2 row that samples from it
  assert names == [f'{s}_seed{k}.json' for s in ('baseline', 'sim_uc4', 'sim_uc4_stage0.2') for k in (0,)]
  record = json.loads((runs / 'sim_uc4_stage0.2_seed0.json').read_text())
  points = {(p['interval'], p['cfg_scale']) for p in record['curve']}
  assert points == {('all', 1.0), ('all', 2.0), ('official', 2.0)}
  chosen = min(record['curve'], key=lambda p: p['fd'])  # the best curve point, sampled again with more samples
  assert (record['best']['interval'], record['best']['cfg_scale']) == (chosen['interval'], chosen['cfg_scale'])
  assert record['best']['num_samples'] == 24 and all(p['num_samples'] == 16 for p in record['curve'])
  with np.load(runs / record['samples_npz']) as npz:
    assert npz['images'].shape == (8, 32, 32, 1) and npz['images'].dtype == np.uint8
    assert npz['labels'].shape == (8,)
  trained = json.loads((runs / 'sim_uc4_seed0.json').read_text())
  curve = trained['group_branch_curve']  # UC = 4: the group branch probed at 1/4 .. 4/4 of the steps
  assert [c['step'] for c in curve] == [1, 2, 3, 4] and set(curve[0]) == {'step', 'similarity', 'class', 'random'}
  assert set(curve[-1]['class']['0.5']) == {'on', 'off'}
  # A rerun with the same arguments finds everything done (no new runs).
  assert fashion_table1.main(common)['runs'] == []
  # A run another process holds is skipped, and said so, instead of run twice.
  with sweep_files.claim(str(runs / 'baseline_seed0')) as ours:
    assert ours
    rerun = fashion_table1.main(common)
  assert rerun['skipped_busy'] == ['baseline_seed0'] and rerun['runs'] == []
  logged = json.loads((out / 'invocations.json').read_text())
  assert [e['runs'] for e in logged] == [['baseline_seed0', 'sim_uc4_seed0', 'sim_uc4_stage0.2_seed0'], [], []]
  report = fashion_table1.main(common + ['--report_only'])
  assert report['num_runs'] == 3 and 0 <= report['evaluator_test_accuracy'] <= 1
  assert set(report['neighbour_purity']) == {'encoder', 'pixel_pca'}
  rows = {r['name']: r for r in report['settings']}
  assert set(rows['baseline']['fd_curve_per_seed']['0']) == {'all@1', 'all@2', 'official@2'}
  assert json.loads(json_path.read_text())['num_runs'] == 3
  assert (docs / 'table.md').exists() and (docs / 'fd_vs_cfg.png').exists()
  assert len(os.listdir(docs / 'samples')) == 3
  assert sorted(os.listdir(docs / 'grids')) == ['baseline.png', 'sim_uc4.png', 'sim_uc4_stage0.2.png']
  assert report['status'] == 'complete' and report['missing_runs'] == [] and report['in_progress'] == {}
  # Asked for a seed that has not run: partial, the missing runs named, and said so above the table.
  report = fashion_table1.main(common + ['--report_only', '--seeds=0,1'])
  assert report['status'] == 'partial' and report['missing_runs'] == ['baseline_seed1', 'sim_uc4_stage0.2_seed1']
  assert (docs / 'table.md').read_text().startswith('**PARTIAL: 3 runs finished, 2 not yet')


def test_settings_cover_the_issue_rows():
  names = set(fashion_settings.SETTINGS)
  assert {'baseline', 'sim_uc2', 'sim_uc4', 'sim_uc8', 'pca_uc4', 'random_uc4', 'class_uc4', 'sim_uc4_tv100',
          'alt_uc4', 'sim_uc4_stage0.2', 'sim_uc4_stage0.4', 'sim_uc4_stage0.6', 'sim_uc4_no_first',
          'sim_uc4_no_last', 'baseline_long', 'sim_uc4_long'} <= names
  assert not fashion_settings.SETTINGS['alt_uc4'].mixed_steps and fashion_settings.SETTINGS['sim_uc4'].mixed_steps


class Killed(Exception):
  pass


def test_killed_training_resumes_from_its_saved_state_to_the_same_params(sweep, tmp_path, monkeypatch):
  # The sweep's own --out (its encoder, neighbour lists and evaluator; the baseline's config has no neighbour
  # dirs) and another --runs; the sweep's baseline run is the uninterrupted one.
  _, out, common = sweep
  flags = {f: v for f, v in (a.split('=', 1) for a in common)}
  flags.update({'--settings': 'baseline', '--cfg_scales': '1'})
  del flags['--json'], flags['--docs_dir']
  common = [f'{f}={v}' for f, v in flags.items()]
  real = table1.train_run

  def killed_after_first_save(*args, save=None, **kwargs):
    def save_and_die(state, losses):
      save(state, losses)
      raise Killed()
    return real(*args, save=save_and_die, **kwargs)

  killed = tmp_path / 'killed'
  with monkeypatch.context() as patch:
    patch.setattr(table1, 'train_run', killed_after_first_save)
    with pytest.raises(Killed):
      fashion_table1.main(common + [f'--runs={killed}'])
  assert sorted(p.name.split('_state_')[1] for p in (killed / 'params').iterdir()) == ['step2.json', 'step2.msgpack']
  resumed = []
  monkeypatch.setattr(fashion_table1, 'say', resumed.append)
  fashion_table1.main(common + [f'--runs={killed}'])
  assert any('resuming training at step 2 of 4' in line for line in resumed)
  whole_params, = (out / 'runs' / 'params').glob('baseline_seed0_*')
  killed_params, = (killed / 'params').iterdir()  # the saved state is removed once the run is trained
  assert killed_params.name == whole_params.name and killed_params.read_bytes() == whole_params.read_bytes()
  losses = [json.loads((d / 'baseline_seed0.json').read_text())['losses'] for d in (out / 'runs', killed)]
  assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_claim_is_held_by_one_holder(tmp_path):
  path = str(tmp_path / 'run')
  with sweep_files.claim(path) as first:
    with sweep_files.claim(path) as second:  # another open file: what another process would see
      assert first and not second
  with sweep_files.claim(path) as again:
    assert again


def test_invocation_log_keeps_every_process_entry(tmp_path):
  log = str(tmp_path / 'invocations.json')
  first = {'id': 'a', 'started_utc': '2026-12-07T01:00:00+00:00', 'runs': []}
  second = {'id': 'b', 'started_utc': '2026-12-07T01:00:05+00:00', 'runs': []}
  fashion_table1.record_invocation(log, first)
  fashion_table1.record_invocation(log, second)  # a process started beside the first
  first['runs'].append('baseline_seed0')
  fashion_table1.record_invocation(log, first)  # the first process never re-read the file itself
  assert json.loads(open(log).read()) == [first, second]
