"""Statistics of the toy Table 1/2 sweep: paired differences over seeds, Pearson r.

Pure functions of plain numbers (no JAX). A comparison pairs two settings
run with the same seed (same data order, same sampling noise), so the
per-seed differences d_k = a_k - b_k cancel what the seed shares:

  mean d, 95% t-interval mean d +- t_{0.975, n-1} * sd(d) / sqrt(n),
  paired t-test p = 2 * P(T_{n-1} > |mean d| / (sd(d) / sqrt(n))),

and a verdict against the paper's direction of the difference ('lower':
the paper has a < b, e.g. a lower FID): 'reproduced' when the interval
excludes 0 on the paper's side, 'not reproduced' when it excludes 0 on the
other side, 'inconclusive' when it contains 0 (or fewer than 2 pairs).
"""

import math

import numpy as np
from scipy import stats

VERDICTS = ('reproduced', 'not reproduced', 'inconclusive')
DIRECTIONS = ('lower', 'higher')


def mean_sd(values):
  """(mean, sample sd) of the non-None values: (None, None) for none, sd None for one."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def mean_of_dicts(dicts):
  """{key: mean over the dicts that have a non-None value for it}."""
  keys = []
  for d in dicts:
    keys += [k for k in d if k not in keys]
  return {k: mean_sd([d.get(k) for d in dicts])[0] for k in keys}


def paired_difference(a, b, paper_direction, confidence=0.95):
  """Paired comparison of a against b over seeds.

  Args:
    a, b: dicts {seed: value}; only seeds present in both (values not None)
      are paired.
    paper_direction: 'lower' (the paper has a < b) or 'higher'.
    confidence: of the t-interval.

  Returns:
    dict: seeds (the paired seeds), differences (a - b per seed), n, mean,
    sd (ddof 1), interval [low, high] (None for n < 2), t, p (paired t-test,
    two-sided; None for n < 2), verdict (one of VERDICTS).
  """
  if paper_direction not in DIRECTIONS:
    raise ValueError(f'paper_direction={paper_direction!r}; choose one of {DIRECTIONS}.')
  seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
  d = np.asarray([a[s] - b[s] for s in seeds], np.float64)
  n = len(d)
  result = {'seeds': seeds, 'differences': d.tolist(), 'n': n, 'mean': float(d.mean()) if n else None,
            'sd': None, 'interval': None, 't': None, 'p': None, 'confidence': confidence,
            'paper_direction': paper_direction, 'verdict': 'inconclusive'}
  if n < 2:
    return result
  mean, sd = float(d.mean()), float(d.std(ddof=1))
  se = sd / math.sqrt(n)
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
  if se > 0:
    t_value = mean / se
    p = float(2 * stats.t.sf(abs(t_value), n - 1))
  else:  # identical differences: the interval is the point, the test is decided by the sign
    t_value = math.copysign(math.inf, mean) if mean else 0.0
    p = 0.0 if mean else 1.0
  low, high = mean - half, mean + half
  result.update(sd=sd, interval=[low, high], t=t_value, p=p, verdict=verdict(low, high, paper_direction))
  return result


def verdict(low, high, paper_direction):
  """'reproduced' / 'not reproduced' / 'inconclusive' for an interval of a - b."""
  below, above = high < 0, low > 0
  if not (below or above):
    return 'inconclusive'
  agrees = below if paper_direction == 'lower' else above
  return 'reproduced' if agrees else 'not reproduced'


def pearson(x, y):
  """Pearson r of paired values, with n and the two-sided p of H0: r = 0.

  Returns:
    dict n, r, p; r and p None for n < 3 or a constant x or y.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = len(x)
  if n != len(y):
    raise ValueError(f'pearson: {n} x values but {len(y)} y values.')
  if n < 3 or x.std() == 0 or y.std() == 0:
    return {'n': n, 'r': None, 'p': None}
  r = float(np.corrcoef(x, y)[0, 1])
  r = max(-1.0, min(1.0, r))
  if abs(r) == 1.0:
    return {'n': n, 'r': r, 'p': 0.0}
  t_value = r * math.sqrt((n - 2) / (1 - r * r))
  return {'n': n, 'r': r, 'p': float(2 * stats.t.sf(abs(t_value), n - 2))}


def sentence(name, comparison, metric='FD_toy'):
  """One plain sentence: '<name>: FD_toy difference -1.23 [-2.0, -0.4] (p=0.02, 3 seeds): reproduced.'"""
  c = comparison
  if c['n'] == 0:
    return f'{name}: no paired seeds yet: inconclusive.'
  if c['interval'] is None:
    return f"{name}: {metric} difference {c['mean']:+.3f} from 1 seed (no interval): inconclusive."
  low, high = c['interval']
  return (f"{name}: {metric} difference {c['mean']:+.3f}, {100 * c['confidence']:.0f}% interval "
          f"[{low:+.3f}, {high:+.3f}] (paired t-test p = {c['p']:.3g}, {c['n']} seeds; paper: "
          f"{c['paper_direction']}): {c['verdict']}.")
