"""Improved precision and recall (Kynkaanniemi et al. 2019), as ADM computes them.

Each feature set estimates a manifold: the union of balls around its points,
each ball's radius the distance to the point's k-th nearest neighbour in the
same set (k = 3; the point itself is not counted). Then

  precision = fraction of sample points inside the reference manifold,
  recall    = fraction of reference points inside the sample manifold.

ADM (guided-diffusion `ManifoldEstimator`) works with squared Euclidean
distances `|u|^2 - 2 u.v + |v|^2` (clipped at 0), in blocks of 10000 x 10000,
computed in float16 and redone in float32 only when the float16 block
overflows; a point is inside a ball when `d <= r` (ties count). We compute in
JAX, in blocks, with float32 accumulation; `precision='adm_float16'` (the
default) rounds the inputs and the distances to float16 and falls back to
float32 on overflow, as ADM does (ADM also rounds the norms and the product
separately, so agreement is close, not bitwise); `'float32'` keeps full
float32. Memory is one [row, col] block plus [row, k+1] running neighbours,
never the [N, N] matrix; blocks are zero-padded to one shape so each
function compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

NEIGHBORHOOD_SIZE = 3
ROW_BATCH_SIZE = 10000
COL_BATCH_SIZE = 10000
PRECISIONS = ('adm_float16', 'float32')


def _squared_distances(u, v):
  """[A, D], [B, D] float32 -> [A, B] squared Euclidean distances (>= 0)."""
  norm_u = jnp.sum(u * u, axis=1)[:, None]  # [A, 1]
  norm_v = jnp.sum(v * v, axis=1)[None, :]  # [1, B]
  cross = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)  # [A, B]
  return jnp.maximum(norm_u - 2 * cross + norm_v, 0.0)


def pairwise_distances(u, v, precision='adm_float16'):
  """Squared distances [A, B] between rows of u [A, D] and v [B, D]."""
  if precision not in PRECISIONS:
    raise ValueError(f'Unknown precision {precision!r}; choose one of {PRECISIONS}.')
  u, v = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
  if precision == 'float32':
    return _squared_distances(u, v)
  half = _squared_distances(u.astype(jnp.float16).astype(jnp.float32),
                            v.astype(jnp.float16).astype(jnp.float32)).astype(jnp.float16)
  # As ADM: keep the float16 block unless it overflowed.
  return jax.lax.cond(jnp.all(jnp.isfinite(half)),
                      lambda: half.astype(jnp.float32),
                      lambda: _squared_distances(u, v))


def _pad_rows(x, size):
  """Pads [n, ...] with zero rows to [size, ...]: one block shape, one compilation."""
  return np.pad(x, [(0, size - len(x))] + [(0, 0)] * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=('num', 'precision'))
def _smallest_distances(rows, cols, num_cols, best, num, precision):
  """Merges the `num` smallest distances of rows to the first num_cols cols into best [R, num]."""
  d = pairwise_distances(rows, cols, precision)  # [R, C]
  d = jnp.where(jnp.arange(cols.shape[0])[None, :] < num_cols, d, jnp.inf)  # padding is far
  merged = jnp.concatenate([best, d], axis=1)  # [R, num + C]
  return -jax.lax.top_k(-merged, num)[0]  # [R, num], ascending


@functools.partial(jax.jit, static_argnames=('precision',))
def _in_balls_both(a, radii_a, b, radii_b, precision):
  """For a [A, D] and b [B, D] with radii: is each a in some b-ball, each b in some a-ball."""
  d = pairwise_distances(a, b, precision)  # [A, B]
  a_in_b = jnp.any(d <= radii_b[None, :], axis=1)  # [A]
  b_in_a = jnp.any(d <= radii_a[:, None], axis=0)  # [B]
  return a_in_b, b_in_a


def manifold_radii(features, k=NEIGHBORHOOD_SIZE, row_batch_size=ROW_BATCH_SIZE,
                   col_batch_size=COL_BATCH_SIZE, precision='adm_float16'):
  """Squared distance from each point to its k-th nearest other point.

  Args:
    features: [N, D], N > k.
    k: neighbourhood size (ADM: 3).
    row_batch_size, col_batch_size: block sizes of the distance matrix.
    precision: 'adm_float16' or 'float32' (module docstring).

  Returns:
    [N] float32 radii (squared distances, as ADM compares squared distances).
  """
  features = np.asarray(features, np.float32)
  n = len(features)
  if features.ndim != 2 or n <= k:
    raise ValueError(f'Manifold radii with k={k} need features [N, D] with N > {k}; '
                     f'got shape {features.shape}.')
  rb, cb = min(row_batch_size, n), min(col_batch_size, n)
  radii = np.empty([n], np.float32)
  for r0 in range(0, n, rb):
    count = min(rb, n - r0)
    rows = _pad_rows(features[r0:r0 + count], rb)
    best = jnp.full([rb, k + 1], jnp.inf, jnp.float32)  # includes the point itself
    for c0 in range(0, n, cb):
      cols = features[c0:c0 + cb]
      best = _smallest_distances(rows, _pad_rows(cols, cb), len(cols), best, k + 1, precision)
    radii[r0:r0 + count] = np.asarray(best[:count, k])
  return radii


def precision_recall(ref_features, sample_features, k=NEIGHBORHOOD_SIZE,
                     row_batch_size=ROW_BATCH_SIZE, col_batch_size=COL_BATCH_SIZE,
                     precision='adm_float16', ref_radii=None):
  """ADM's precision and recall of samples against a reference set.

  Args:
    ref_features: [N1, D] reference features (ADM: pool_3 of the ref batch).
    sample_features: [N2, D] sample features.
    k: neighbourhood size of both manifolds.
    row_batch_size, col_batch_size: block sizes (memory ~ row * col floats).
    precision: 'adm_float16' or 'float32'.
    ref_radii: optional precomputed `manifold_radii(ref_features, ...)`.

  Returns:
    (precision, recall) as Python floats in [0, 1].
  """
  ref = np.asarray(ref_features, np.float32)
  sample = np.asarray(sample_features, np.float32)
  if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
    raise ValueError(f'Features must be [N1, D] and [N2, D]; got {ref.shape} and {sample.shape}.')
  kwargs = dict(k=k, row_batch_size=row_batch_size, col_batch_size=col_batch_size,
                precision=precision)
  if ref_radii is None:
    ref_radii = manifold_radii(ref, **kwargs)
  sample_radii = manifold_radii(sample, **kwargs)
  rb, cb = min(row_batch_size, len(ref)), min(col_batch_size, len(sample))
  ref_in = np.zeros([len(ref)], bool)  # ref point inside the sample manifold
  sample_in = np.zeros([len(sample)], bool)  # sample point inside the ref manifold
  for r0 in range(0, len(ref), rb):
    nr = min(rb, len(ref) - r0)
    refs = _pad_rows(ref[r0:r0 + nr], rb)
    ref_r = np.pad(ref_radii[r0:r0 + nr], (0, rb - nr), constant_values=-1.0)  # padding: no ball
    for s0 in range(0, len(sample), cb):
      ns = min(cb, len(sample) - s0)
      samples = _pad_rows(sample[s0:s0 + ns], cb)
      sample_r = np.pad(sample_radii[s0:s0 + ns], (0, cb - ns), constant_values=-1.0)
      a_in, b_in = _in_balls_both(refs, ref_r, samples, sample_r, precision)
      ref_in[r0:r0 + nr] |= np.asarray(a_in)[:nr]
      sample_in[s0:s0 + ns] |= np.asarray(b_in)[:ns]
  return float(sample_in.mean()), float(ref_in.mean())
