"""The step-kind plan of GroupDiff-l / -f training."""

import subprocess
import sys

import numpy as np
import pytest

from groupdiff_jax import step_plan
from groupdiff_jax.step_plan import SubBatch


def test_groupdiff_l_alternating_kinds_hold_the_same_number_of_images():
  kinds = step_plan.step_kinds(256, 4, 0.1, mixed_steps=False)
  assert kinds == {'singles': (SubBatch(256, 1, True),), 'groups': (SubBatch(256, 4, False),)}
  assert kinds['groups'][0].num_groups == 64


def test_groupdiff_f_groups_the_conditional_images_too():
  kinds = step_plan.step_kinds(256, 4, 0.1, mode='groupdiff_f', mixed_steps=False)
  assert kinds['singles'] == (SubBatch(256, 4, True),)
  assert kinds['groups'] == (SubBatch(256, 4, False),)


def test_mixed_steps_hold_both_parts_at_the_group_ratio():
  kinds = step_plan.step_kinds(64, 4, 0.25, mixed_steps=True)
  assert kinds == {'mixed': (SubBatch(48, 1, True), SubBatch(16, 4, False))}


def test_mixed_is_the_default_with_the_nearest_whole_groups():
  # 10% of 256 = 25.6 images -> 6 groups of 4 (24 images); a small batch keeps at least one group
  assert step_plan.step_kinds(256, 4, 0.1) == {'mixed': (SubBatch(232, 1, True), SubBatch(24, 4, False))}
  assert step_plan.step_kinds(16, 4, 0.1) == {'mixed': (SubBatch(12, 1, True), SubBatch(4, 4, False))}
  assert step_plan.step_kinds(32, 4, 1.0) == {'groups': (SubBatch(32, 4, False),)}
  with pytest.raises(ValueError, match='mixed_steps=False'):
    step_plan.step_kinds(4, 4, 0.1)


def test_group_ratio_zero_is_plain_training():
  assert step_plan.step_kinds(32, 4, 0.0) == {'singles': (SubBatch(32, 1, True),)}


@pytest.mark.parametrize('ratio', [0.1, 0.25, 0.5])
def test_plan_gives_the_configured_ratio_exactly_per_block(ratio):
  kinds = step_plan.step_kinds(64, 4, ratio, mixed_steps=False)
  names = [step_plan.step_kind_name(7, s, kinds, ratio) for s in range(1000)]
  blocks = np.array([n == 'groups' for n in names]).reshape(10, 100)
  assert (blocks.sum(1) == round(ratio * 100)).all()
  # positions differ from block to block (not a fixed pattern)
  assert len({tuple(np.flatnonzero(b)) for b in blocks}) > 1


def test_plan_is_a_pure_function_of_seed_and_step():
  kinds = step_plan.step_kinds(64, 4, 0.1, mixed_steps=False)
  a = [step_plan.step_kind_name(3, s, kinds, 0.1) for s in range(300)]
  b = [step_plan.step_kind_name(3, s, kinds, 0.1) for s in reversed(range(300))][::-1]
  assert a == b
  assert a != [step_plan.step_kind_name(4, s, kinds, 0.1) for s in range(300)]


def test_plan_is_identical_in_separate_processes():
  """Every host computes the plan alone: two processes must agree."""
  code = ('from groupdiff_jax import step_plan as p;'
          'k = p.step_kinds(64, 4, 0.1, mixed_steps=False);'
          'print("".join("g" if p.step_kind_name(11, s, k, 0.1) == "groups" else "s" for s in range(500)))')
  outs = {subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         env={'PYTHONHASHSEED': str(seed), 'PATH': ''}).stdout for seed in (1, 2)}
  assert len(outs) == 1 and outs.pop().count('g') == 50


def test_bad_plans_are_rejected_with_the_value():
  with pytest.raises(ValueError, match='batch_size=30'):
    step_plan.step_kinds(30, 4, 0.1)
  with pytest.raises(ValueError, match='group_ratio=1.5'):
    step_plan.step_kinds(32, 4, 1.5)
  with pytest.raises(ValueError, match='train.mode'):
    step_plan.step_kinds(32, 4, 0.1, mode='groupdiff_x')
