"""DiT's Gaussian diffusion (DDPM with learned-range variance) in pure JAX.

Maps to facebookresearch/DiT `diffusion/` with DiT's default configuration
(`create_diffusion`: linear betas, epsilon prediction, learn_sigma=True ->
LEARNED_RANGE, loss type MSE, so `loss = mse + vb` with vb in bits per dim
and NOT rescaled by num_timesteps / 1000: that factor is DiT's RESCALED_MSE
only). What DiT keeps as methods of `GaussianDiffusion` / `SpacedDiffusion`
are pure functions here over a frozen `DiffusionSchedule` of arrays:

  DiT                                   here
  get_named_beta_schedule('linear', T)  linear_beta_schedule(T)
  GaussianDiffusion.__init__            make_schedule(betas, timestep_map)
  q_mean_variance / q_sample            q_mean_variance / q_sample
  q_posterior_mean_variance             q_posterior_mean_variance
  _predict_xstart_from_eps              predict_x0_from_eps
  p_mean_variance (model output given)  p_mean_variance
  _vb_terms_bpd                         vb_terms_bpd
  training_losses                       training_loss_terms / training_losses
  p_sample / p_sample_loop              p_sample_step / ddpm_sample
  ddim_sample / ddim_sample_loop        ddim_step / ddim_sample
  respace.py                            diffusion/respace.py

Layout is NHWC: x is [B, H, W, C] and a learned-sigma model output is
[B, H, W, 2C] with eps in the first C channels of the LAST axis and the
variance values in the last C (DiT splits axis 1 of NCHW).

Timesteps: `t` (or `t_index`) always indexes the schedule's own arrays (a
respaced schedule has fewer steps); models always receive
`schedule.timestep_map[t]`, the original-scale integer timestep, as DiT's
`_WrappedModel` does.

Loss: `training_losses` returns one loss per image [B]. The official
GroupDiff code takes the plain mean over the batch (`loss.mean()`); the
paper writes a sum over group members, the same up to a constant factor.

Constants are computed in float64 NumPy (as DiT) and stored as float32.
"""

import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


NUM_TIMESTEPS = 1000  # DiT's training diffusion steps T; the model sees t in [0, T)


def linear_beta_schedule(num_timesteps=NUM_TIMESTEPS):
  """DiT's 'linear' betas, scaled by 1000 / T: float64 [T]."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiffusionSchedule:
  """Per-step constants of a (possibly respaced) DDPM; every field is [S].

  S = num_timesteps of this schedule (1000 for training, e.g. 250 for
  sampling). `timestep_map[i]` is the original timestep of step i (the
  model's t input); identity for an unrespaced schedule. A pytree, so it can
  be passed to jitted functions or closed over.
  """
  betas: jax.Array
  log_betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array  # step 0 uses step 1's value
  posterior_mean_coef1: jax.Array  # multiplies x_0
  posterior_mean_coef2: jax.Array  # multiplies x_t
  fixed_large_log_variance: jax.Array  # DiT FIXED_LARGE, for C-channel models
  timestep_map: jax.Array  # int32

  @property
  def num_timesteps(self):
    return self.betas.shape[0]


def make_schedule(betas, timestep_map=None):
  """DiffusionSchedule from betas (float64 [S]) and original timesteps [S]."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f'betas must be 1-D with at least 2 steps, got {betas.shape}')
  if not ((betas > 0).all() and (betas <= 1).all()):
    raise ValueError('betas must lie in (0, 1]')
  if timestep_map is None:
    timestep_map = np.arange(betas.shape[0])
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
  as_f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return DiffusionSchedule(
      betas=as_f32(betas),
      log_betas=as_f32(np.log(betas)),
      alphas_cumprod=as_f32(alphas_cumprod),
      alphas_cumprod_prev=as_f32(alphas_cumprod_prev),
      sqrt_alphas_cumprod=as_f32(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=as_f32(np.sqrt(1.0 - alphas_cumprod)),
      log_one_minus_alphas_cumprod=as_f32(np.log(1.0 - alphas_cumprod)),
      sqrt_recip_alphas_cumprod=as_f32(np.sqrt(1.0 / alphas_cumprod)),
      sqrt_recipm1_alphas_cumprod=as_f32(np.sqrt(1.0 / alphas_cumprod - 1.0)),
      posterior_variance=as_f32(posterior_variance),
      posterior_log_variance_clipped=as_f32(posterior_log_variance_clipped),
      posterior_mean_coef1=as_f32(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)),
      posterior_mean_coef2=as_f32((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)),
      fixed_large_log_variance=as_f32(np.log(np.append(posterior_variance[1], betas[1:]))),
      timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
  )


def _at(values, t, ndim):
  """values[t] shaped [B, 1, ..., 1] (ndim axes) to broadcast against x."""
  return values[t].reshape(t.shape + (1,) * (ndim - 1))


def mean_flat(x):
  """Mean over all non-batch axes: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# --- forward process -------------------------------------------------------

def q_mean_variance(x0, t, schedule):
  """q(x_t | x_0). x0: [B, H, W, C]; t: int [B]. Returns (mean, variance,
  log_variance), each [B, H, W, C]."""
  shape = x0.shape
  mean = _at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
  variance = jnp.broadcast_to(_at(jnp.square(schedule.sqrt_one_minus_alphas_cumprod), t, x0.ndim), shape)
  log_variance = jnp.broadcast_to(_at(schedule.log_one_minus_alphas_cumprod, t, x0.ndim), shape)
  return mean, variance, log_variance


def q_sample(x0, t, noise, schedule):
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise: [B, H, W, C]."""
  return (_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior_mean_variance(x0, xt, t, schedule):
  """q(x_{t-1} | x_t, x_0). Returns (mean, variance, log_variance_clipped),
  each [B, H, W, C]."""
  mean = (_at(schedule.posterior_mean_coef1, t, xt.ndim) * x0
          + _at(schedule.posterior_mean_coef2, t, xt.ndim) * xt)
  variance = jnp.broadcast_to(_at(schedule.posterior_variance, t, xt.ndim), xt.shape)
  log_variance = jnp.broadcast_to(_at(schedule.posterior_log_variance_clipped, t, xt.ndim), xt.shape)
  return mean, variance, log_variance


def predict_x0_from_eps(xt, t, eps, schedule):
  """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): [B, H, W, C]."""
  return (_at(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
          - _at(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)


def predict_eps_from_x0(xt, t, x0, schedule):
  """Inverse of predict_x0_from_eps: [B, H, W, C]."""
  return ((_at(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
          / _at(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim))


# --- reverse process -------------------------------------------------------

class ModelPosterior(NamedTuple):
  """p(x_{t-1} | x_t) from one model output; every field [B, H, W, C]."""
  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_x0: jax.Array


def p_mean_variance(model_output, xt, t, schedule, clip_denoised=False):
  """The model's Gaussian p(x_{t-1} | x_t) (DiT LEARNED_RANGE, EPSILON).

  Args:
    model_output: [B, H, W, 2C] (eps, then variance values v in [-1, 1]:
      log_var = frac * log(beta_t) + (1 - frac) * posterior_log_var_clipped
      with frac = (v + 1) / 2), or [B, H, W, C] (eps only: DiT's FIXED_LARGE
      variance, its default when learn_sigma is False).
    xt: [B, H, W, C]; t: int [B] step indices of `schedule`.
    clip_denoised: clip the x_0 prediction to [-1, 1] (DiT's p_sample
      defaults to True, but DiT's sample.py and GroupDiff pass False).
  """
  channels = xt.shape[-1]
  model_output = model_output.astype(jnp.float32)
  eps = model_output[..., :channels]
  if model_output.shape[-1] == 2 * channels:
    frac = (model_output[..., channels:] + 1.0) / 2.0
    min_log = _at(schedule.posterior_log_variance_clipped, t, xt.ndim)
    max_log = _at(schedule.log_betas, t, xt.ndim)
    log_variance = frac * max_log + (1.0 - frac) * min_log
  elif model_output.shape[-1] == channels:
    log_variance = jnp.broadcast_to(_at(schedule.fixed_large_log_variance, t, xt.ndim), xt.shape)
  else:
    raise ValueError(f'model output {model_output.shape} fits neither C nor 2C for x {xt.shape}')
  pred_x0 = predict_x0_from_eps(xt, t, eps, schedule)
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(pred_x0, xt, t, schedule)
  return ModelPosterior(mean, jnp.exp(log_variance), log_variance, pred_x0)


# --- likelihood terms ------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """DiT's tanh approximation of the standard normal CDF, elementwise."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) in nats of N(means, e^{2 log_scales}) discretised to 256 bins
  on [-1, 1] (bin half-width 1/255; the edge bins take the tails). All
  arguments and the result share one shape."""
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(model_output, x0, xt, t, schedule):
  """One VLB term per image in bits per dim: [B].

  KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder
  NLL -log p(x_0 | x_1) for t == 0 (index 0 of `schedule`).
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(x0, xt, t, schedule)
  model = p_mean_variance(model_output, xt, t, schedule, clip_denoised=False)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, model.mean, model.log_variance)) / math.log(2.0)
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
      x0, model.mean, 0.5 * model.log_variance)) / math.log(2.0)
  return jnp.where(t == 0, decoder_nll, kl)


# --- training --------------------------------------------------------------

def training_loss_terms(model_fn, x0, t, noise, schedule):
  """DiT's hybrid loss terms per image: {'loss', 'mse', 'vb'}, each [B].

  Args:
    model_fn: (x_t [B, H, W, C], t_model int32 [B]) -> [B, H, W, 2C] or
      [B, H, W, C]; t_model = schedule.timestep_map[t].
    x0: [B, H, W, C] clean latents; t: int [B]; noise: [B, H, W, C].

  mse = mean over H, W, C of (eps_pred - noise)^2. With a 2C output, vb is
  the VLB term of `vb_terms_bpd` computed with eps stop-gradiented (DiT's
  `frozen_out`: the VLB trains only the variance); a C output has vb = 0.
  """
  x0 = x0.astype(jnp.float32)
  xt = q_sample(x0, t, noise, schedule)
  model_output = model_fn(xt, schedule.timestep_map[t]).astype(jnp.float32)
  channels = x0.shape[-1]
  eps = model_output[..., :channels]
  mse = mean_flat(jnp.square(noise - eps))
  if model_output.shape[-1] == 2 * channels:
    frozen_output = jnp.concatenate(
        [jax.lax.stop_gradient(eps), model_output[..., channels:]], axis=-1)
    vb = vb_terms_bpd(frozen_output, x0, xt, t, schedule)
  else:
    vb = jnp.zeros_like(mse)
  return {'loss': mse + vb, 'mse': mse, 'vb': vb}


def training_losses(model_fn, x0, t, noise, schedule):
  """Per-image hybrid loss mse + vb: [B] (see training_loss_terms)."""
  return training_loss_terms(model_fn, x0, t, noise, schedule)['loss']


def sample_group_timesteps(rng, num_groups, group_size, num_timesteps, offset_fraction):
  """Training timesteps with GroupDiff's intra-group variance: int32 [G * N].

  A base step t0 ~ U{0, ..., T-1} per group; off = int(offset_fraction * T);
  every member (anchor included) draws uniformly from the integers in
  [max(0, t0 - off), min(T - 1, t0 + off)]. off = 0 gives every member t0.
  num_timesteps and offset_fraction are Python numbers (static under jit);
  members of a group are contiguous. Follows the official
  `models/dit.py:get_timesteps`: the interval is clipped BEFORE the uniform
  draw, so near 0 and T-1 members are uniform on the shorter interval (not
  piled up on the boundary as clipping a drawn value would do).
  """
  offset = int(offset_fraction * num_timesteps)
  base_rng, member_rng = jax.random.split(rng)
  t0 = jax.random.randint(base_rng, (num_groups, 1), 0, num_timesteps, dtype=jnp.int32)
  if offset == 0:
    return jnp.broadcast_to(t0, (num_groups, group_size)).reshape(-1)
  low = jnp.maximum(t0 - offset, 0)
  high = jnp.minimum(t0 + offset, num_timesteps - 1)
  members = jax.random.randint(member_rng, (num_groups, group_size), low, high + 1, dtype=jnp.int32)
  return members.reshape(-1)


# --- sampling --------------------------------------------------------------

def _nonzero_mask(t_index, ndim):
  """1.0 where t_index != 0, as [B, 1, ..., 1]: no noise at the last step."""
  return (t_index != 0).astype(jnp.float32).reshape(t_index.shape + (1,) * (ndim - 1))


def p_sample_step(model_output, x, t_index, noise, schedule, clip_denoised=False):
  """One ancestral DDPM step x_t -> x_{t-1}.

  model_output: [B, H, W, 2C] or [B, H, W, C]; x, noise: [B, H, W, C];
  t_index: int [B] step indices of `schedule`. Returns (x_prev, pred_x0).
  """
  model = p_mean_variance(model_output, x, t_index, schedule, clip_denoised)
  x_prev = model.mean + _nonzero_mask(t_index, x.ndim) * jnp.exp(0.5 * model.log_variance) * noise
  return x_prev, model.pred_x0


def ddim_step(model_output, x, t_index, noise, schedule, eta=0.0, clip_denoised=False):
  """One DDIM step (DDIM paper eq. 12); same arguments as p_sample_step.

  eps is re-derived from pred_x0 as DiT does (differs only with clipping).
  """
  model = p_mean_variance(model_output, x, t_index, schedule, clip_denoised)
  eps = predict_eps_from_x0(x, t_index, model.pred_x0, schedule)
  alpha_bar = _at(schedule.alphas_cumprod, t_index, x.ndim)
  alpha_bar_prev = _at(schedule.alphas_cumprod_prev, t_index, x.ndim)
  sigma = (eta * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
           * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev))
  mean = (model.pred_x0 * jnp.sqrt(alpha_bar_prev)
          + jnp.sqrt(1.0 - alpha_bar_prev - jnp.square(sigma)) * eps)
  x_prev = mean + _nonzero_mask(t_index, x.ndim) * sigma * noise
  return x_prev, model.pred_x0


def sample_loop(step_fn, denoise_fn, x_T, rng, schedule, use_noise=True):
  """Runs step_fn from step S-1 down to 0 in a lax.fori_loop: [B, H, W, C].

  step_fn(model_output, x, t_index, noise) -> (x_prev, pred_x0);
  denoise_fn(x [B, H, W, C], t_model int32 [B]) -> model output, where
  t_model = schedule.timestep_map[t_index] (original scale). The noise of
  loop iteration i is drawn from fold_in(rng, i).
  """
  num_steps = schedule.num_timesteps
  batch = x_T.shape[0]

  def body(i, x):
    t_index = jnp.full((batch,), num_steps - 1 - i, dtype=jnp.int32)
    model_output = denoise_fn(x, schedule.timestep_map[t_index])
    if use_noise:
      noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    else:
      noise = jnp.zeros_like(x)
    x_prev, _ = step_fn(model_output, x, t_index, noise)
    return x_prev

  return jax.lax.fori_loop(0, num_steps, body, x_T.astype(jnp.float32))


def ddpm_sample(denoise_fn: Callable, x_T, rng, schedule, clip_denoised=False):
  """Ancestral DDPM sampling (DiT p_sample_loop): x_T [B, H, W, C] -> x_0."""
  step_fn = lambda out, x, t, noise: p_sample_step(out, x, t, noise, schedule, clip_denoised)
  return sample_loop(step_fn, denoise_fn, x_T, rng, schedule)


def ddim_sample(denoise_fn: Callable, x_T, rng: Optional[jax.Array], schedule,
                eta=0.0, clip_denoised=False):
  """DDIM sampling (DiT ddim_sample_loop): x_T [B, H, W, C] -> x_0.

  With eta == 0 the path is deterministic and rng is not used (may be None).
  """
  step_fn = lambda out, x, t, noise: ddim_step(out, x, t, noise, schedule, eta, clip_denoised)
  return sample_loop(step_fn, denoise_fn, x_T, rng, schedule, use_noise=eta != 0.0)
