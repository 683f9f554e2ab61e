"""The toy Table 1/2 sweep (experiments/table1.py) end to end at a tiny size, its settings and its data."""

import json
import math
import os

import numpy as np
import pytest

from configs import toy_table1
from experiments import table1, table1_settings
from groupdiff_jax import errors, step_plan, train
from groupdiff_jax.data import toy_shapes


def test_toy_shapes_are_a_pure_function_of_the_seed():
  images, labels, attributes = toy_shapes.make_shapes(60, seed=3)
  again, again_labels, _ = toy_shapes.make_shapes(60, seed=3)
  other, _, _ = toy_shapes.make_shapes(60, seed=4)
  assert images.shape == (60, 16, 16, 3) and images.dtype == np.float32
  assert images.min() >= -1 and images.max() <= 1
  assert attributes.shape == (60, len(toy_shapes.ATTRIBUTES))
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(labels, again_labels)
  assert not np.array_equal(images, other)
  assert np.bincount(labels, minlength=10).tolist() == [6] * 10  # balanced classes


def test_toy_shapes_options_draw_only_the_given_textures_and_sizes():
  default = toy_shapes.make_shapes(40, seed=3)
  explicit = toy_shapes.make_shapes(40, seed=3, textures=toy_shapes.TEXTURES, size_range=toy_shapes.SIZE_RANGE)
  for a, b in zip(default, explicit):
    np.testing.assert_array_equal(a, b)
  _, _, attributes = toy_shapes.make_shapes(200, seed=3, textures=('solid', 'dots'), size_range=(0.5, 0.8))
  columns = {name: attributes[:, i] for i, name in enumerate(toy_shapes.ATTRIBUTES)}
  assert set(columns['texture'].tolist()) == {toy_shapes.TEXTURES.index('solid'), toy_shapes.TEXTURES.index('dots')}
  assert columns['size'].min() >= 0.5 and columns['size'].max() <= 0.8


@pytest.mark.parametrize('textures, size_range', [(('checks',), (0.3, 0.6)), ((), (0.3, 0.6)),
                                                  (('solid',), (0.6, 0.3)), (('solid',), (0.0, 0.5))])
def test_toy_shapes_options_reject_bad_values(textures, size_range):
  with pytest.raises(errors.ConfigError):
    toy_shapes.make_shapes(10, seed=0, textures=textures, size_range=size_range)


def test_config_data_textures_and_size_range_reach_the_batches():
  config = toy_table1.get_config()
  with config.unlocked():
    config.data.num_images = 100
    config.data.textures = 'solid'
    config.data.size_range = (0.5, 0.8)
  assert toy_shapes.data_options(config.data) == {'textures': ('solid',), 'size_range': (0.5, 0.8)}
  batch_images = train.make_batches(config).images
  solid_images, _, _ = toy_shapes.make_shapes(100, 0, textures=('solid',), size_range=(0.5, 0.8))
  np.testing.assert_array_equal(batch_images, solid_images)
  args = table1.parse_args(['--out=/unused', '--textures=solid,dots', '--size_range=0.5,0.8'])
  data = table1.base_config(args).data
  assert (data.textures, tuple(data.size_range)) == ('solid,dots', (0.5, 0.8))
  with pytest.raises(errors.ConfigError):
    table1.base_config(table1.parse_args(['--out=/unused', '--size_range=half']))


def test_make_batches_serves_similarity_groups_that_share_colours():
  config = toy_table1.get_config()
  with config.unlocked():
    config.data.num_images = 400
    config.train.batch_size = 32
  batches = train.make_batches(config)
  kinds = step_plan.step_kinds(32, 4, 0.2, mixed_steps=False)
  (groups,) = batches.batch(3, kinds['groups'])
  assert groups['images'].shape == (32, 16, 16, 3)
  # Neighbours by pixels share colours: members differ less than random images do.
  members = groups['images'].reshape(8, 4, -1).mean(-1)  # mean intensity per image
  within = np.abs(members - members[:, :1]).mean()
  random = np.abs(members.reshape(-1) - np.random.default_rng(0).permutation(members.reshape(-1))).mean()
  assert within < random
  again = train.make_batches(config).batch(3, kinds['groups'])[0]
  np.testing.assert_array_equal(again['labels'], groups['labels'])


SMOKE_ARGS = ['--seeds=0', '--num_steps=3', '--num_samples=16', '--chunk=16', '--probe_images=8',
              '--num_images=300', '--hidden_size=32', '--depth=1', '--batch_size=8', '--feature_steps=2',
              '--held_out=32', '--sample_steps=4']


def test_table1_smoke_table2_row_reuses_the_trained_model_and_reports_trajectory_s_cross(tmp_path):
  out, runs = str(tmp_path / 'table1'), str(tmp_path / 'kept_runs')
  report_path = str(tmp_path / 'docs' / 'table1.json')
  argv = [f'--out={out}', f'--runs={runs}', f'--json={report_path}', '--settings=sim_uc4_stage0.4'] + SMOKE_ARGS
  result = table1.main(argv)
  rows = {row['name']: row for row in result['settings']}
  assert list(rows) == ['sim_uc4', 'sim_uc4_stage0.4']  # the trained row a Table 2 row needs comes first
  with open(report_path) as f:
    report = json.load(f)
  assert report == json.loads(json.dumps(result))
  for key in ('evaluator_real_accuracy', 'machine', 'commands', 'wall_seconds', 'settings', 'comparisons',
              'correlation_s_cross_fd'):
    assert key in report, key
  assert 0 <= report['evaluator_real_accuracy'] <= 1 and report['commands'][0].startswith('python -m')
  assert report['fd_real_held_out'] == report['meta']['fd_real_held_out'] >= 0
  for row in report['settings']:
    for key in ('name', 'group_size', 'grouping', 'sigma_tv', 'seeds', 'fd', 'fd_per_seed', 'class_accuracy',
                'class_accuracy_per_seed', 's_cross', 's_cross_per_seed', 's_cross_per_stage', 's_cross_per_layer'):
      assert key in row, key
    assert row['seeds'] == [0] and row['group_size'] == 4 and row['grouping'] == 'similarity'
    assert math.isfinite(row['fd']) and row['fd'] >= 0 and 0 <= row['class_accuracy'] <= 1
    assert 0 <= row['s_cross'] <= 100 and 0 < row['self_mass_fraction'] < 1
    assert sum(row['share_histogram']['counts']) > 0
  # 4 steps at t = 0, 0.25, 0.5, 0.75: all probed for 'all'; with group attention in 0-0.4 only t = 0, 0.25.
  assert all(v is not None for v in rows['sim_uc4']['s_cross_per_stage'].values())
  assert [v is not None for v in rows['sim_uc4_stage0.4']['s_cross_per_stage'].values()] == [True, True, False, False]
  assert list(rows['sim_uc4']['s_cross_per_layer']) == ['0']
  (comparison,) = [c for c in report['comparisons'] if c['b'] == 'sim_uc4']
  assert comparison['a'] == 'sim_uc4_stage0.4' and comparison['n'] == 1 and comparison['verdict'] == 'inconclusive'
  with open(os.path.join(runs, 'sim_uc4_stage0.4_seed0.json')) as f:
    run = json.load(f)
  assert run['train_seconds'] == 0.0 and run['s_cross']['probed'] == [True, True, False, False]
  assert run['s_cross_renoised']['stages_with_group_attention'] == [0.0, 0.25]
  assert len(os.listdir(os.path.join(runs, 'params'))) == 1

  # Resume (the sweep loop alone: no evaluator needed when nothing is left to run): every run is finished.
  args = table1.parse_args(argv)
  done = []
  table1.run_sweep(args, table1.base_config(args), list(rows), [0], None, None, None, done.append)
  assert done == []
  other = table1.parse_args([a if not a.startswith('--num_samples') else '--num_samples=8' for a in argv])
  with pytest.raises(errors.UserError, match='another config'):
    table1.run_sweep(other, table1.base_config(other), list(rows), [0], None, None, None, done.append)
  rescored = table1.parse_args(argv + ['--feature_steps=3'])  # another evaluator: FD not comparable
  with pytest.raises(errors.UserError, match='--feature_steps=2'):
    table1.run_sweep(rescored, table1.base_config(rescored), list(rows), [0], None, None, None, done.append)

  # A second invocation over another setting in the same folder (as two sweeps on two cores would; a sampling-only
  # row: it samples the first invocation's trained model): the report keeps every setting with runs, and the
  # invocation log keeps both calls.
  second = table1.main([a if not a.startswith('--settings') else '--settings=sim_uc4_cfg1' for a in argv])
  assert [row['name'] for row in second['settings']] == ['sim_uc4', 'sim_uc4_stage0.4', 'sim_uc4_cfg1']
  assert len(os.listdir(os.path.join(runs, 'params'))) == 1  # nothing trained again
  with open(os.path.join(out, 'invocations.json')) as f:
    invocations = json.load(f)
  assert [i['runs'] for i in invocations] == [['sim_uc4_seed0', 'sim_uc4_stage0.4_seed0'], ['sim_uc4_cfg1_seed0']]
  # The report alone, from the runs on disk: nothing trained or sampled, no invocation logged.
  os.remove(report_path)
  again = table1.main(argv + ['--report_only'])
  assert json.loads(json.dumps(again['settings'])) == json.loads(json.dumps(second['settings']))
  assert os.path.exists(report_path) and os.path.exists(os.path.join(out, 'table1_table2_bars.png'))
  with open(os.path.join(out, 'invocations.json')) as f:
    assert len(json.load(f)) == 2


def test_removed_group_layers_take_a_third_of_the_blocks():
  assert table1_settings.removed_group_layers(28, 'first') == (9, None)  # the paper's layers 1-9 of 28
  assert table1_settings.removed_group_layers(4, 'first') == (1, None)
  assert table1_settings.removed_group_layers(4, 'last') == (0, 3)
  with pytest.raises(errors.ConfigError, match='depth'):
    table1_settings.removed_group_layers(1, 'first')


def test_diagnostic_rows_sample_the_trained_models_at_cfg_1_or_without_group_attention():
  base = toy_table1.get_config()
  assert table1_settings.check_settings(['sim_uc4_cfg1', 'baseline_cfg1', 'sim_uc4_stage0']) == [
      'sim_uc4', 'sim_uc4_cfg1', 'baseline', 'baseline_cfg1', 'sim_uc4_stage0']
  for name, source in (('sim_uc4_cfg1', 'sim_uc4'), ('baseline_cfg1', 'baseline'), ('sim_uc4_stage0', 'sim_uc4')):
    # A sampling-only row trains nothing of its own: the source's training config, to the key.
    assert table1.config_hash(table1_settings.training_config(base, name, 1)) == table1.config_hash(
        table1_settings.training_config(base, source, 1))
  cfg1 = table1_settings.setting_config(base, 'sim_uc4_cfg1', 1, 64).sample
  stage0 = table1_settings.setting_config(base, 'sim_uc4_stage0', 1, 64).sample
  assert (cfg1.cfg_scale, cfg1.group_stage_fraction, cfg1.uncond_group_size) == (1.0, 1.0, 4)
  assert (stage0.cfg_scale, stage0.group_stage_fraction) == (base.sample.cfg_scale, 0.0)
  assert base.sample.cfg_scale != 1.0


def test_unknown_settings_are_refused():
  with pytest.raises(errors.ConfigError, match='Unknown settings'):
    table1_settings.check_settings(['sim_uc3'])
