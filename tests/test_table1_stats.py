"""Paired differences over seeds and Pearson r (experiments/table1_stats.py) against closed forms."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments import table1_stats


def t2_quantile(p):
  """Student t quantile with 2 degrees of freedom in closed form: F(t) = 1/2 + t / (2 sqrt(2 + t^2))."""
  q = 2 * p - 1
  return q * math.sqrt(2 / (1 - q * q))


def test_three_seeds_match_the_hand_computed_t_interval_and_p_value():
  # d = a - b = 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); df = 2 has closed forms.
  result = table1_stats.paired_difference({0: 11.0, 1: 12.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0}, 'lower')
  half = t2_quantile(0.975) / math.sqrt(3)
  assert result['n'] == 3 and result['seeds'] == [0, 1, 2]
  assert result['mean'] == pytest.approx(2.0) and result['sd'] == pytest.approx(1.0)
  np.testing.assert_allclose(result['interval'], [2 - half, 2 + half], rtol=1e-12)
  t_value = 2 * math.sqrt(3)
  assert result['t'] == pytest.approx(t_value)
  assert result['p'] == pytest.approx(1 - t_value / math.sqrt(2 + t_value ** 2), rel=1e-12)  # 2 * (1 - F(t))
  assert result['verdict'] == 'inconclusive'  # [-0.48, 4.48] contains 0


def test_verdicts_follow_the_papers_direction():
  lower = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
  higher = {s: v + 10 + 0.1 * s for s, v in lower.items()}  # a - b = -10 - 0.1 s: all clearly below 0
  assert table1_stats.paired_difference(lower, higher, 'lower')['verdict'] == 'reproduced'
  assert table1_stats.paired_difference(lower, higher, 'higher')['verdict'] == 'not reproduced'
  assert table1_stats.paired_difference(higher, lower, 'higher')['verdict'] == 'reproduced'
  noisy = {0: 1.0, 1: -1.0, 2: 2.0, 3: -2.0}
  assert table1_stats.paired_difference(noisy, {s: 0.0 for s in noisy}, 'lower')['verdict'] == 'inconclusive'


def test_interval_and_p_agree_with_scipy_for_five_seeds():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=5), rng.normal(size=5)
  result = table1_stats.paired_difference(dict(enumerate(a)), dict(enumerate(b)), 'lower')
  test = stats.ttest_rel(a, b)
  assert result['p'] == pytest.approx(test.pvalue, rel=1e-10)
  interval = stats.t.interval(0.95, 4, loc=np.mean(a - b), scale=stats.sem(a - b))
  np.testing.assert_allclose(result['interval'], interval, rtol=1e-10)


def test_only_seeds_present_in_both_are_paired_and_one_pair_is_inconclusive():
  result = table1_stats.paired_difference({0: 1.0, 1: 2.0, 5: 9.0}, {1: 0.0, 2: 4.0, 5: None}, 'higher')
  assert result['seeds'] == [1] and result['n'] == 1 and result['mean'] == 2.0
  assert result['interval'] is None and result['p'] is None and result['verdict'] == 'inconclusive'
  assert 'inconclusive' in table1_stats.sentence('x vs y', result)


def test_identical_differences_give_a_point_interval():
  result = table1_stats.paired_difference({0: 1.0, 1: 2.0}, {0: 2.0, 1: 3.0}, 'lower')
  assert result['interval'] == [-1.0, -1.0] and result['p'] == 0.0 and result['verdict'] == 'reproduced'


def test_pearson_matches_scipy_and_needs_three_points():
  x, y = [1.0, 2.0, 3.0, 4.0, 6.0], [2.0, 1.0, 4.0, 3.0, 7.0]
  result = table1_stats.pearson(x, y)
  expected = stats.pearsonr(x, y)
  assert result['n'] == 5
  assert result['r'] == pytest.approx(expected.statistic, rel=1e-12)
  assert result['p'] == pytest.approx(expected.pvalue, rel=1e-9)
  assert table1_stats.pearson([1.0, 2.0], [3.0, 1.0]) == {'n': 2, 'r': None, 'p': None}


def test_an_unknown_direction_is_refused():
  with pytest.raises(ValueError, match='paper_direction'):
    table1_stats.paired_difference({0: 1.0}, {0: 2.0}, 'better')
