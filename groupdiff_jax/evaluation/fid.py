"""Frechet distance between Gaussian fits of Inception features (FID, sFID).

The ADM protocol (openai/guided-diffusion `evaluations/evaluator.py`) fits a
Gaussian to a feature set, `mu = mean`, `sigma = np.cov(rowvar=False)`
(unbiased, N-1), and compares two fits with

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)).

FID uses the 2048-d `pool_3` features, sFID the 2023-d spatial features
(see inception.py). The matrix square root is scipy's, with the pytorch-fid /
ADM fallback: if it is not finite, eps is added to both diagonals and it is
retried; a complex result whose diagonal has an imaginary part above 1e-3 is
an error, a smaller one is numerical noise and dropped.

ADM reference batches (`VIRTUAL_imagenet256_labeled.npz`) hold the fits under
the keys `mu`, `sigma` (FID) and `mu_s`, `sigma_s` (sFID); `FIDStatistics`
reads and writes that layout.
"""

import dataclasses
import warnings

import numpy as np
from etils import epath

from groupdiff_jax import errors, storage

# Key names of an ADM reference batch: (mean, covariance) for FID and sFID.
POOL_KEYS = ('mu', 'sigma')
SPATIAL_KEYS = ('mu_s', 'sigma_s')


def feature_statistics(features):
  """Gaussian fit of a feature set.

  Args:
    features: [N, D] array, N >= 2.

  Returns:
    (mu [D] float64, sigma [D, D] float64), sigma the unbiased covariance
    (np.cov with rowvar=False, as ADM).
  """
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f'Features must be [N, D]; got shape {features.shape}.')
  if features.shape[0] < 2:
    raise ValueError(f'A covariance needs at least 2 feature vectors; got {features.shape[0]}.')
  features = features.astype(np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1, mu2: [D] means.
    sigma1, sigma2: [D, D] covariances.
    eps: diagonal offset added to both covariances when sqrtm of the product
      is not finite (ADM and pytorch-fid use 1e-6).

  Returns:
    The squared Frechet distance as a Python float (what FID reports).

  Raises:
    ValueError: mismatched shapes, or sqrtm with a large imaginary part.
  """
  from scipy import linalg  # pylint: disable=g-import-not-at-top  (scipy costs ~0.3 s)

  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f'Means have different shapes: {mu1.shape} vs {mu2.shape}.')
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f'Covariances must both be [D, D] with D = {mu1.shape[0]}; '
                     f'got {sigma1.shape} and {sigma2.shape}.')

  diff = mu1 - mu2
  # The product may be nearly singular (e.g. fewer samples than dimensions).
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f'FID: sqrtm of the covariance product is not finite; adding {eps} to the '
                  'diagonal of both covariances.')
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  # Numerical error may leave a small imaginary component.
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}.')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclasses.dataclass
class FIDStatistics:
  """Gaussian fits of the pool (FID) and spatial (sFID) features of one set.

  Attributes:
    mu: [D] mean of the pool_3 features (D = 2048 with the real network).
    sigma: [D, D] their covariance.
    mu_s: [Ds] mean of the spatial features (Ds = 2023), or None.
    sigma_s: [Ds, Ds] their covariance, or None.
  """
  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None

  @classmethod
  def from_features(cls, pool, spatial=None):
    """Fits of pool [N, D] and (optionally) spatial [N, Ds] features."""
    mu, sigma = feature_statistics(pool)
    mu_s, sigma_s = feature_statistics(spatial) if spatial is not None else (None, None)
    return cls(mu, sigma, mu_s, sigma_s)

  @property
  def has_spatial(self):
    return self.mu_s is not None and self.sigma_s is not None

  def fid(self, other):
    """FID between this set and `other` (pool features)."""
    return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

  def sfid(self, other):
    """sFID between this set and `other` (spatial features)."""
    if not (self.has_spatial and other.has_spatial):
      raise ValueError('sFID needs spatial statistics (mu_s, sigma_s) on both sides.')
    return frechet_distance(self.mu_s, self.sigma_s, other.mu_s, other.sigma_s)

  def save(self, path, **extra_arrays):
    """Writes an npz with ADM's key names (plus any extra arrays, e.g. arr_0)."""
    arrays = dict(zip(POOL_KEYS, (self.mu, self.sigma)))
    if self.has_spatial:
      arrays.update(zip(SPATIAL_KEYS, (self.mu_s, self.sigma_s)))
    storage.save_npz(path, **arrays, **extra_arrays)

  @classmethod
  def load(cls, path):
    """Reads `mu`, `sigma` and, if present, `mu_s`, `sigma_s` from an npz."""
    stats = maybe_load(path)
    if stats is None:
      raise errors.DataError(f'{path}: no FID statistics; the npz needs the keys {POOL_KEYS} '
                             f'(and {SPATIAL_KEYS} for sFID).')
    return stats


def maybe_load(path):
  """FIDStatistics stored in an npz, or None when it has no `mu`/`sigma`.

  Only the statistics arrays are read, never `arr_0` (np.load is lazy).
  """
  if not epath.Path(path).exists():
    raise errors.MissingInputError(f'No such file: {path}; check the path of the .npz.')
  try:
    data = np.load(epath.Path(path).open('rb'))
    keys = set(data.files)
  except (OSError, ValueError, EOFError, AttributeError) as error:  # not an npz (np.load of a .npy: no .files)
    raise errors.DataError(f'{path}: not an .npz file (np.savez output): {error}') from None
  with data:
    if not set(POOL_KEYS) <= keys:
      return None
    mu, sigma = (np.asarray(data[k], np.float64) for k in POOL_KEYS)
    mu_s = sigma_s = None
    if set(SPATIAL_KEYS) <= keys:
      mu_s, sigma_s = (np.asarray(data[k], np.float64) for k in SPATIAL_KEYS)
  for name, m, s in (('mu/sigma', mu, sigma), ('mu_s/sigma_s', mu_s, sigma_s)):
    if m is not None and (m.ndim != 1 or s.shape != (m.shape[0],) * 2):
      raise errors.DataError(f'{path}: {name} must be [D] and [D, D]; got {m.shape} and {s.shape}.')
  return FIDStatistics(mu, sigma, mu_s, sigma_s)
