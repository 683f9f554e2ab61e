"""The toy Table 1 sweep (experiments/table1.py) end to end at a tiny size, and its data."""

import json
import math
import os

import numpy as np

from configs import toy_table1
from experiments import table1
from groupdiff_jax import step_plan, train
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


def test_make_batches_serves_similarity_groups_that_share_colours():
  config = toy_table1.get_config()
  with config.unlocked():
    config.data.num_images = 400
    config.train.batch_size = 32
  batches = train.make_batches(config)
  kinds = step_plan.step_kinds(32, 4, 0.2)
  (groups,) = batches.batch(3, kinds['groups'])
  assert groups['images'].shape == (32, 16, 16, 3)
  # Neighbours by pixels share colours: members differ less than random images do.
  members = groups['images'].reshape(8, 4, -1).mean(-1)  # mean intensity per image
  within = np.abs(members - members[:, :1]).mean()
  random = np.abs(members.reshape(-1) - np.random.default_rng(0).permutation(members.reshape(-1))).mean()
  assert within < random
  again = train.make_batches(config).batch(3, kinds['groups'])[0]
  np.testing.assert_array_equal(again['labels'], groups['labels'])


def test_table1_smoke_writes_rows_with_finite_values(tmp_path):
  out = str(tmp_path / 'table1')
  result = table1.main([
      f'--out={out}', '--settings=sim_uc2', '--seeds=0', '--num_steps=3', '--num_samples=16',
      '--chunk=16', '--probe_images=8', '--num_images=300', '--hidden_size=32', '--depth=1', '--batch_size=8',
      '--feature_steps=2', '--held_out=32', '--sample_steps=4'])
  rows = {row['setting']: row for row in result['rows']}
  assert list(rows) == ['sim_uc2']  # (one setting: each compiles its own step and sampler)
  for row in rows.values():
    assert row['num_runs'] == 1 and math.isfinite(row['fd_toy_mean']) and row['fd_toy_mean'] >= 0
    assert 0 <= row['class_accuracy_mean'] <= 1
  assert abs(rows['sim_uc2']['s_cross_mean']) < 1e-4  # one other member: max = mean (the paper's 0.00%)
  with open(os.path.join(out, 'results.json')) as f:
    assert len(json.load(f)['rows']) == 1
  with open(os.path.join(out, 'table.md')) as f:
    assert len(f.read().strip().splitlines()) == 2 + 1  # header, rule, the setting
  for name in ('runs/sim_uc2_seed0.json', 'samples_sim_uc2.png'):  # (plots need two settings)
    assert os.path.exists(os.path.join(out, name)), name
