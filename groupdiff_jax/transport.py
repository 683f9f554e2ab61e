"""SiT transport objective: interpolant paths, predictions and their losses.

Time runs from noise to data as in SiT (willisma/SiT): x_t = alpha_t x_1 +
sigma_t x_0 with x_0 ~ N(0, I) the noise and x_1 the data, so t = 0 is pure
noise and t = 1 is clean data. Paths (SiT's coupling plans):

  linear  alpha = t,                sigma = 1 - t                (default)
  gvp     alpha = sin(pi t / 2),    sigma = cos(pi t / 2)
  vp      alpha = exp(m(t)),        sigma = sqrt(1 - exp(2 m(t))),
          m(t) = -(1 - t)^2 (b_max - b_min) / 4 - (1 - t) b_min / 2,
          b_min = 0.1, b_max = 20

Predictions: 'velocity' (target d x_t / dt = alpha' x_1 + sigma' x_0, the
default), 'noise' (target x_0) and 'score' (target -x_0 / sigma_t). Loss
weights of noise/score models as SiT: None, 'velocity' ((w_t / sigma_t)^2)
or 'likelihood' (w_t / sigma_t^2), with w_t = (alpha'/alpha) sigma^2 -
sigma sigma' (SiT's `drift_var`).

Training times: the group sampler draws t in [0, 1]; `time_interval` maps
it affinely onto SiT's training interval, which avoids the singular ends
for noise/score models (train_eps 1e-3) and VP (1e-5); linear/GVP velocity
models train on all of [0, 1] (train_eps 0).

Samplers (samplers.py) receive a prediction and turn it into the ODE drift
(velocity) and the score with `velocity_and_score`; guidance is linear in
the prediction, so guiding any of the three gives the same velocity.
"""

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from groupdiff_jax import errors

PATHS = ('linear', 'gvp', 'vp')
PREDICTIONS = ('velocity', 'noise', 'score')
LOSS_WEIGHTS = (None, 'velocity', 'likelihood')
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


@dataclasses.dataclass(frozen=True)
class Transport:
  """Which SiT transport a model is trained / sampled with (hashable)."""
  path: str = 'linear'
  prediction: str = 'velocity'
  loss_weight: Optional[str] = None

  def __post_init__(self):
    if self.path not in PATHS:
      raise errors.ConfigError(f'Unknown model.path={self.path!r}; choose one of {PATHS}.')
    if self.prediction not in PREDICTIONS:
      raise errors.ConfigError(f'Unknown model.prediction={self.prediction!r}; choose one of {PREDICTIONS}.')
    if self.loss_weight not in LOSS_WEIGHTS:
      raise errors.ConfigError(f'Unknown model.loss_weight={self.loss_weight!r}; choose one of {LOSS_WEIGHTS}.')

  @property
  def train_eps(self):
    """SiT `create_transport`: distance kept from the ends while training."""
    if self.path == 'vp':
      return 1e-5
    return 0.0 if self.prediction == 'velocity' else 1e-3

  @property
  def sample_eps(self):
    """SiT `create_transport`: distance kept from the ends while sampling."""
    if self.path == 'vp':
      return 1e-3
    return 0.0 if self.prediction == 'velocity' else 1e-3


def transport_from_config(model_config):
  """Transport of a `model` config section (path, prediction, loss_weight)."""
  return Transport(path=model_config.path, prediction=model_config.prediction,
                   loss_weight=model_config.loss_weight or None)


def time_interval(transport, sde=False, last_step_size=0.0, sampling=False):
  """SiT's `check_interval` (forward time): (t0, t1).

  Training (sampling=False) uses train_eps, sampling sample_eps. The SDE
  sampler stops at 1 - last_step_size and takes its last step separately;
  it also starts at eps (SiT: SBDM SDEs and non-velocity models).
  """
  eps = transport.sample_eps if sampling else transport.train_eps
  t0, t1 = 0.0, 1.0
  if transport.path == 'vp':
    t1 = 1.0 - eps if (not sde or last_step_size == 0) else 1.0 - last_step_size
  elif transport.prediction != 'velocity' or sde:
    t0 = eps
    t1 = 1.0 - eps if (not sde or last_step_size == 0) else 1.0 - last_step_size
  return t0, t1


def _expand(t, x):
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


def path_coefficients(path, t):
  """(alpha, d alpha / dt, sigma, d sigma / dt) at t (any shape)."""
  if path == 'linear':
    return t, jnp.ones_like(t), 1.0 - t, -jnp.ones_like(t)
  if path == 'gvp':
    half_pi = math.pi / 2
    return (jnp.sin(half_pi * t), half_pi * jnp.cos(half_pi * t),
            jnp.cos(half_pi * t), -half_pi * jnp.sin(half_pi * t))
  if path == 'vp':
    spread = VP_BETA_MAX - VP_BETA_MIN
    log_mean = -0.25 * (1.0 - t) ** 2 * spread - 0.5 * (1.0 - t) * VP_BETA_MIN
    d_log_mean = 0.5 * (1.0 - t) * spread + 0.5 * VP_BETA_MIN
    alpha = jnp.exp(log_mean)
    sigma = jnp.sqrt(1.0 - jnp.exp(2.0 * log_mean))
    return alpha, alpha * d_log_mean, sigma, -jnp.exp(2.0 * log_mean) * d_log_mean / sigma
  raise ValueError(f'Unknown path {path!r}; choose one of {PATHS}.')


def drift_coefficients(path, t):
  """(a_t, w_t): the probability-flow velocity is v = a_t x + w_t score.

  a_t = alpha'/alpha, w_t = a_t sigma^2 - sigma sigma' (SiT compute_drift;
  w_t is also SiT's "SBDM" diffusion coefficient). VP: a_t = w_t = beta_t/2.
  """
  alpha, d_alpha, sigma, d_sigma = path_coefficients(path, t)
  ratio = d_alpha / alpha
  return ratio, ratio * sigma**2 - sigma * d_sigma


def interpolate(x_data, noise, t, path='linear'):
  """x_t and the velocity target. x_data, noise: [B, ...]; t: [B]."""
  alpha, d_alpha, sigma, d_sigma = path_coefficients(path, _expand(t, x_data))
  return alpha * x_data + sigma * noise, d_alpha * x_data + d_sigma * noise


def velocity_and_score(prediction, x, t, transport):
  """(ODE velocity, score) at (x, t) from a model prediction of any kind.

  Follows SiT's conversions: velocity -> score via get_score_from_velocity;
  noise -> score = -eps / sigma; score -> velocity = a_t x + w_t score.
  """
  ratio, w = drift_coefficients(transport.path, _expand(t, x))
  if transport.prediction == 'velocity':
    alpha, d_alpha, sigma, d_sigma = path_coefficients(transport.path, _expand(t, x))
    reverse_ratio = alpha / d_alpha
    score = (reverse_ratio * prediction - x) / (sigma**2 - reverse_ratio * d_sigma * sigma)
    return prediction, score
  if transport.prediction == 'noise':
    sigma = path_coefficients(transport.path, _expand(t, x))[2]
    score = -prediction / sigma
  else:
    score = prediction
  return ratio * x + w * score, score


def sample_group_times(rng, num_groups, group_size, timestep_jitter=0.0):
  """Training times with GroupDiff's intra-group variance (official code).

  A base time t0 ~ U[0, 1] per group; every member (anchor included) draws
  its own time uniformly in [max(0, t0 - jitter), min(1, t0 + jitter)].
  jitter 0 gives every member t0 (the official default); the paper's
  100/1000 steps is jitter 0.1.

  Returns:
    [num_groups * group_size] float32, members of a group contiguous.
  """
  base_rng, member_rng = jax.random.split(rng)
  t0 = jax.random.uniform(base_rng, (num_groups, 1))
  if timestep_jitter == 0.0:
    return jnp.broadcast_to(t0, (num_groups, group_size)).reshape(-1)
  low = jnp.maximum(t0 - timestep_jitter, 0.0)
  high = jnp.minimum(t0 + timestep_jitter, 1.0)
  u = jax.random.uniform(member_rng, (num_groups, group_size))
  return (low + u * (high - low)).reshape(-1)


def per_image_loss(velocity_pred, velocity_target):
  """Mean squared velocity error over each image's elements: [B, ...] -> [B]."""
  return jnp.mean(jnp.square(velocity_pred - velocity_target), axis=tuple(range(1, velocity_pred.ndim)))


def training_loss(model_fn, x_data, noise, t, transport=Transport()):
  """Per-image SiT loss.

  Args:
    model_fn: (x_t [B, H, W, C], t [B]) -> prediction [B, H, W, C'] with
      C' >= C; only the first C channels are used, as SiT drops a
      learned-sigma half.
    x_data: [B, H, W, C] clean latents.
    noise: [B, H, W, C] standard normal.
    t: [B] times in [0, 1]; mapped affinely onto the transport's training
      interval (the identity for the default linear velocity model).
    transport: path, prediction and loss weight (default: linear velocity).

  Returns:
    [B] per-image losses. The step takes their plain mean over the batch,
    as the official GroupDiff code does; the paper writes the group loss as
    a sum over members, which differs only by the constant factor N.
  """
  t0, t1 = time_interval(transport)
  if (t0, t1) != (0.0, 1.0):
    t = t0 + (t1 - t0) * t
  x_t, target = interpolate(x_data, noise, t, transport.path)
  prediction = model_fn(x_t, t)[..., :x_data.shape[-1]]
  if transport.prediction == 'velocity':
    return per_image_loss(prediction, target)
  sigma = path_coefficients(transport.path, _expand(t, x_data))[2]
  _, w = drift_coefficients(transport.path, _expand(t, x_data))
  weight = {None: 1.0, 'velocity': (w / sigma) ** 2, 'likelihood': w / sigma**2}[transport.loss_weight]
  if transport.prediction == 'noise':
    error = prediction - noise
  else:
    error = prediction * sigma + noise
  return jnp.mean(weight * jnp.square(error), axis=tuple(range(1, x_data.ndim)))
