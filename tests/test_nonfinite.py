"""A non-finite step is skipped (state unchanged), counted, and too many in a row stop the run."""

import functools
import logging

import jax
import numpy as np
import pytest

from groupdiff_jax import step_plan, train, train_step
from groupdiff_jax.data.digits import DigitsBatches
from groupdiff_jax.models.dit import model_from_config
from tests.test_resume import assert_trees_equal, tiny_config


def jitted_step_and_batch(config):
  """The jitted train step of 16 digits in groups of 4 and its first batch."""
  (kind,) = step_plan.step_kinds(16, 4, 0.0).values()
  data_config = config.copy_and_resolve_references()
  data_config.train.batch_size, data_config.data.grouping = 16, 'random'
  batch = DigitsBatches(data_config, seed=0).batch(0, kind)
  step = jax.jit(functools.partial(train_step.train_step, kind=kind, train_config=config.train,
                                   optim_config=config.optim, max_group_size=config.model.max_group_size,
                                   null_class=config.model.num_classes, model_config=config.model))
  return step, batch


def test_a_poisoned_batch_leaves_params_optimizer_and_ema_unchanged():
  config = tiny_config(**{'train.group_ratio': 0.0})
  state = train_step.create_train_state(model_from_config(config.model), config, jax.random.PRNGKey(0))
  step, batch = jitted_step_and_batch(config)
  skipped, metrics = step(state, train.poisoned(batch))
  assert int(metrics['nonfinite']) == 1 and not np.isfinite(float(metrics['loss']))
  assert int(skipped.step) == 1
  for field in ('params', 'ema_params', 'opt_state', 'rng'):
    assert_trees_equal(getattr(skipped, field), getattr(state, field))
  updated, metrics = step(skipped, batch)
  assert int(metrics['nonfinite']) == 0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), updated.params, state.params)
  assert any(jax.tree.leaves(changed))


def test_skipped_steps_are_counted_in_the_logged_metrics():
  metrics = [{'loss': np.float32(1.0), 'grad_norm': np.float32(2.0), 'nonfinite': np.int32(0)},
             {'loss': np.float32(np.nan), 'grad_norm': np.float32(np.nan), 'nonfinite': np.int32(1)},
             {'loss': np.float32(3.0), 'grad_norm': np.float32(4.0), 'nonfinite': np.int32(0)}]
  assert train.summarize(metrics) == {'loss': 2.0, 'grad_norm': 3.0, 'nonfinite_steps': 1}


def test_the_loop_skips_a_poisoned_step_and_stops_after_too_many_in_a_row(tmp_path, caplog):
  overrides = {'train.group_ratio': 0.0, 'train.num_steps': 3, 'train.poison_step': 1, 'data.grouping': 'random'}
  with caplog.at_level(logging.WARNING):
    state = train.train_and_evaluate(tiny_config(**overrides, **{'train.max_nonfinite_steps': 2}),
                                     str(tmp_path / 'a'))
  assert int(state.step) == 3 and np.isfinite(jax.tree.leaves(state.params)[0]).all()
  assert 'Step 2: the loss or gradient norm is not finite' in caplog.text
  with pytest.raises(FloatingPointError, match=r'up to step 2 .*train.max_nonfinite_steps=1'):
    train.train_and_evaluate(tiny_config(**overrides, **{'train.max_nonfinite_steps': 1}), str(tmp_path / 'b'))
