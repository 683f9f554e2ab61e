"""Samplers with classifier-free guidance and group inference, both objectives.

One guided model function (`make_guided_model_fn`) holds all of the CFG and
group logic; every sampler calls it:

  objective  sample.sampler  function             model calls per branch
  sit        euler | heun    integrate_ode        num_steps | 2 * num_steps
  sit        sde             integrate_sde        num_steps (Euler-Maruyama + last step)
  sit        dopri5          integrate_adaptive   as used (returned)
  dit        ddpm | ddim     sample_diffusion     respaced steps (num_steps)

SiT samplers take the model's prediction (velocity, noise or score; see
transport.py); DiT samplers take epsilon plus learned variance values.

GroupDiff-l (official): the conditional branch runs with `cond_group_size`
(1: each image alone) and the unconditional branch with
`uncond_group_size` (e.g. 4: the group jointly):
    out_i = out_u(X)_i + s * (out_c(x_i) - out_u(X)_i)
on the guided channels inside the guidance interval, and the conditional
output alone outside it. GroupDiff-f groups both branches. A learned
variance (DiT) is never guided: it is taken from the conditional branch, as
the official GroupDiff/DiT code does. Sample ids are drawn afresh for every
model call (official), unless fixed ids are asked for.

Common scale of the guidance interval and the group stage window
----------------------------------------------------------------
Both are expressed through one number per model call, the *noise level*
tau in [0, 1]: tau = 1 is pure noise, tau = 0 clean data.

  objective  model time                      tau
  sit        t in [0, 1], 0 = noise (SiT)    1 - t
  dit        original timestep k in [0, T)   k / T  (T = 1000; k = 999 -> 0.999)

- Guidance applies when `guidance_low <= tau <= guidance_high`. For DiT this
  is exactly the official GroupDiff test `low * 1000 <= k <= high * 1000`;
  for SiT it is the official GroupDiff/REPA test on their time, which runs
  the other way from ours (their t = 1 is noise, i.e. their t = our 1 - t).
  The released settings ([0, 1] for DiT, [0.25, 0.75] for SiT) are
  symmetric, so the direction only matters for asymmetric intervals.
- Group attention is on while the fraction of the trajectory done from the
  noise end, 1 - tau, is below `group_stage_fraction` (SiT: while t < f;
  DiT: while k > (1 - f) * T). 1.0: always; 0.4: the first (noisiest) 40%.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from groupdiff_jax import diffusion as gd
from groupdiff_jax import errors
from groupdiff_jax import transport as transport_lib
from groupdiff_jax.models.embeddings import draw_sample_ids

ODE_SAMPLERS = ('euler', 'heun')  # fixed-step ODE (integrate_ode)
SIT_SAMPLERS = ODE_SAMPLERS + ('sde', 'dopri5')  # + Euler-Maruyama SDE, adaptive ODE
SAMPLERS = SIT_SAMPLERS  # SiT; kept for callers of the foundation's name
DIFFUSION_SAMPLERS = ('ddpm', 'ddim')
SAMPLERS_BY_OBJECTIVE = {'sit': SIT_SAMPLERS, 'dit': DIFFUSION_SAMPLERS}
SDE_DIFFUSION_FORMS = ('SBDM', 'sigma', 'constant')
SDE_LAST_STEPS = ('Mean', 'Euler', 'Tweedie', None)
# Where SiT's SBDM diffusion coefficient (1 - t) / t (linear path) is
# evaluated at most/least: official GroupDiff clamps its time to
# [1e-4, 0.999], i.e. our t to [1e-3, 1 - 1e-4]; SiT itself would divide by 0.
SBDM_T_RANGE = (1e-3, 1.0 - 1e-4)


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
  """How the model output of a batch of groups is combined at one step.

  cfg_scale: s; 1.0 runs the conditional branch only.
  guidance_low, guidance_high: noise levels tau (module docstring) where
    guidance applies; [0, 1] everywhere.
  guided_channels: None guides every data channel; 3 guides the first three
    as the official DiT/SiT/GroupDiff code ("legacy" CFG).
  cond_group_size, uncond_group_size: group sizes of the two branches.
  group_stage_fraction: group attention only during this fraction of the
    trajectory from the noise end (1.0: always).
  fixed_sample_ids: member i gets id i instead of random ids.
  """
  cfg_scale: float = 1.0
  guidance_low: float = 0.0
  guidance_high: float = 1.0
  guided_channels: Optional[int] = None
  cond_group_size: int = 1
  uncond_group_size: int = 1
  group_stage_fraction: float = 1.0
  fixed_sample_ids: bool = False


def guidance_from_config(sample_config):
  return GuidanceConfig(
      cfg_scale=sample_config.cfg_scale, guidance_low=sample_config.guidance_low,
      guidance_high=sample_config.guidance_high, guided_channels=sample_config.guided_channels or None,
      cond_group_size=sample_config.cond_group_size, uncond_group_size=sample_config.uncond_group_size,
      group_stage_fraction=sample_config.group_stage_fraction, fixed_sample_ids=sample_config.fixed_sample_ids)


def combine_guidance(cond, uncond, scale, guided_channels=None):
  """uncond + s * (cond - uncond) on the guided channels; cond elsewhere.

  cond, uncond: [B, H, W, C] (NHWC: channels last).
  """
  guided = uncond + scale * (cond - uncond)
  if guided_channels is None or guided_channels >= cond.shape[-1]:
    return guided
  return jnp.concatenate([guided[..., :guided_channels], cond[..., guided_channels:]], axis=-1)


def guidance_applies(noise_level, guidance):
  """Whether a model call at noise level tau (module docstring) is guided: low <= tau <= high."""
  return (noise_level >= guidance.guidance_low) & (noise_level <= guidance.guidance_high)


def group_attention_on(noise_level, group_stage_fraction):
  """Whether a model call at noise level tau uses group attention: done fraction 1 - tau < f (f >= 1: always)."""
  if group_stage_fraction >= 1.0:
    return jnp.asarray(True)
  if group_stage_fraction <= 0.0:
    return jnp.asarray(False)
  return noise_level > 1.0 - group_stage_fraction


def branch_rngs(rng):
  """(conditional, unconditional) keys of one guided model call from its key `rng`."""
  return jax.random.split(rng)


def branch_sample_ids(rng, num_images, group_size, max_group_size, fixed=False):
  """Sample ids [num_images] a branch of `make_guided_model_fn` draws from its key (None: no sample table).

  A probe that wants the ids a sampler step actually used (e.g. S_cross on
  the sampler's trajectory) calls this with `branch_rngs(step_key)[i]`.
  """
  if max_group_size <= 0:
    return None
  return draw_sample_ids(rng, num_images // group_size, group_size, max_group_size, fixed)


def make_guided_model_fn(apply_fn, params, labels, guidance, *, null_class, max_group_size, data_channels,
                         keep_extra_channels=False):
  """model(x [B,H,W,C], t_model, noise_level, rng) -> output, with CFG and groups.

  Args:
    apply_fn, params: the DiT (`model.apply`) and its parameters.
    labels: [B] class of every image; B must be a whole number of groups of
      both branches' sizes.
    guidance: GuidanceConfig.
    null_class: label of the unconditional class.
    max_group_size: the model's sample-table size (0: no sample ids).
    data_channels: C; the first C output channels are guided.
    keep_extra_channels: False returns [B, H, W, C] (SiT: a learned-sigma
      half is dropped); True returns every output channel, those after the
      first C (DiT's variance values) from the conditional branch.

  The returned function takes t_model (what the model sees: SiT time or the
  original DiT timestep; a scalar or [B]), noise_level (scalar tau, see the
  module docstring) and a key for the sample ids of this call.
  """
  num_images = labels.shape[0]
  for size in (guidance.cond_group_size, guidance.uncond_group_size):
    if num_images % size:
      raise ValueError(f'{num_images} images are not whole groups of {size}; '
                       'make the number of images a multiple of both group sizes.')
  null_labels = jnp.full_like(labels, null_class)

  def branch(x, t_model, branch_labels, group_size, rng, group_attention):
    ids = branch_sample_ids(rng, num_images, group_size, max_group_size, guidance.fixed_sample_ids)
    t_batch = jnp.broadcast_to(jnp.asarray(t_model), (num_images,))
    out = apply_fn({'params': params}, x, t_batch, branch_labels, ids, group_size=group_size,
                   group_attention=group_attention)
    return out if keep_extra_channels else out[..., :data_channels]

  def model_with(group_attention):
    def fn(x, t_model, noise_level, rng):
      cond_rng, uncond_rng = branch_rngs(rng)
      cond = branch(x, t_model, labels, guidance.cond_group_size, cond_rng, group_attention)
      if guidance.cfg_scale == 1.0:
        return cond

      def guided(_):
        uncond = branch(x, t_model, null_labels, guidance.uncond_group_size, uncond_rng, group_attention)
        mixed = combine_guidance(cond[..., :data_channels], uncond[..., :data_channels], guidance.cfg_scale,
                                 guidance.guided_channels)
        return jnp.concatenate([mixed, cond[..., data_channels:]], axis=-1)  # variance: conditional branch

      return jax.lax.cond(guidance_applies(noise_level, guidance), guided, lambda _: cond, None)
    return fn

  with_groups, without_groups = model_with(True), model_with(False)
  if guidance.group_stage_fraction >= 1.0:
    return with_groups
  if guidance.group_stage_fraction <= 0.0:
    return without_groups

  def model(x, t_model, noise_level, rng):
    early = group_attention_on(noise_level, guidance.group_stage_fraction)
    return jax.lax.cond(early, with_groups, without_groups, x, t_model, noise_level, rng)

  return model


def make_prediction_fn(apply_fn, params, labels, guidance, *, null_class, max_group_size, data_channels):
  """SiT: prediction(x [B,H,W,C], t scalar, rng) -> [B,H,W,C] with CFG and groups.

  The raw (guided) model prediction: a velocity, noise or score as the
  model was trained (transport.py). t is SiT time (0 = noise, 1 = data);
  its noise level is 1 - t.
  """
  model = make_guided_model_fn(apply_fn, params, labels, guidance, null_class=null_class,
                               max_group_size=max_group_size, data_channels=data_channels)
  return lambda x, t, rng: model(x, t, 1.0 - t, rng)


def make_velocity_fn(apply_fn, params, labels, guidance, *, null_class, max_group_size, data_channels,
                     transport=transport_lib.Transport()):
  """SiT: velocity(x [B,H,W,C], t scalar, rng) -> [B,H,W,C] with CFG and groups.

  A noise or score model's guided prediction is converted to the ODE
  velocity of its path (transport.velocity_and_score).
  """
  predict = make_prediction_fn(apply_fn, params, labels, guidance, null_class=null_class,
                               max_group_size=max_group_size, data_channels=data_channels)
  if transport.prediction == 'velocity':
    return predict
  return lambda x, t, rng: transport_lib.velocity_and_score(predict(x, t, rng), x, t, transport)[0]


def make_denoise_fn(apply_fn, params, labels, guidance, rng, *, null_class, max_group_size, data_channels,
                    num_train_timesteps=gd.NUM_TIMESTEPS):
  """DiT: denoise(x [B,H,W,C], t_model int [B]) -> [B,H,W,2C] (eps guided,
  variance values of the conditional branch) for gd.sample_loop.

  t_model is the original timestep (all images share it while sampling); its
  noise level is t_model / num_train_timesteps. The sample ids of a call
  come from fold_in(rng, t_model), so every step draws fresh ids.
  """
  model = make_guided_model_fn(apply_fn, params, labels, guidance, null_class=null_class,
                               max_group_size=max_group_size, data_channels=data_channels,
                               keep_extra_channels=True)

  def denoise(x, t_model):
    step = t_model[0]
    return model(x, t_model, step / num_train_timesteps, jax.random.fold_in(rng, step))

  return denoise


def sample_diffusion(denoise_fn, noise, rng, schedule, method='ddpm', eta=0.0):
  """DiT sampling x_T = noise [B, H, W, C] -> x_0 over a (respaced) schedule.

  method: 'ddpm' (ancestral, DiT's p_sample_loop) or 'ddim' (eta 0:
  deterministic). One model evaluation per step of `schedule`.
  """
  if method == 'ddpm':
    return gd.ddpm_sample(denoise_fn, noise, rng, schedule)
  if method == 'ddim':
    return gd.ddim_sample(denoise_fn, noise, rng, schedule, eta=eta)
  raise ValueError(f'Unknown sample.sampler={method!r} for objective dit; choose one of {DIFFUSION_SAMPLERS}.')


def integrate_ode(velocity, noise, rng, num_steps, method='euler', t0=0.0, t1=1.0):
  """Integrate dx/dt = v(x, t) from t0 (0: noise) to t1 (1: data).

  Args:
    velocity: (x, t, rng) -> dx/dt.
    noise: [B, H, W, C] starting point x(t0).
    rng: key; step k uses fold_in(rng, k) (for the sample ids).
    num_steps: uniform steps; Euler makes num_steps velocity evaluations,
      Heun (predictor-corrector on every step) 2 * num_steps.
    method: 'euler' or 'heun'.
    t0, t1: the interval (transport.time_interval: [0, 1] for a linear/GVP
      velocity model, [eps, 1 - eps] for noise/score models and VP).

  Returns:
    x(t1), [B, H, W, C].
  """
  if method not in ODE_SAMPLERS:
    raise ValueError(f'Unknown sample.sampler={method!r}; choose one of {ODE_SAMPLERS}.')
  dt = (t1 - t0) / num_steps

  def step(k, x):
    t = t0 + k * dt
    key = jax.random.fold_in(rng, k)
    v = velocity(x, t, key)
    if method == 'euler':
      return x + dt * v
    x_pred = x + dt * v
    v_next = velocity(x_pred, t + dt, jax.random.fold_in(key, 1))
    return x + 0.5 * dt * (v + v_next)

  return jax.lax.fori_loop(0, num_steps, step, noise)


def number_of_function_evaluations(num_steps, method):
  """Model evaluations per branch of a fixed-step sampler run of num_steps
  steps (euler, sde with a last step, ddpm, ddim: num_steps; heun: 2x).
  dopri5 is adaptive: integrate_adaptive returns the NFE it used."""
  if method == 'dopri5':
    raise ValueError('dopri5 is adaptive: use the NFE that integrate_adaptive returns.')
  return 2 * num_steps if method == 'heun' else num_steps


# --- SiT SDE (Euler-Maruyama) and adaptive ODE (dopri5) ---------------------

def sde_diffusion(transport, t, form='SBDM', norm=1.0):
  """SiT's diffusion coefficient w(t) of the reverse SDE (scalar t).

  'SBDM': w = (alpha'/alpha) sigma^2 - sigma sigma' (score-based DM; the
  official GroupDiff SiT sampler), evaluated at t clipped to SBDM_T_RANGE;
  'sigma': w = sigma_t (SiT's sample.py default); 'constant': w = 1; all
  times `norm`.
  """
  if form == 'SBDM':
    return norm * transport_lib.drift_coefficients(transport.path, jnp.clip(t, *SBDM_T_RANGE))[1]
  if form == 'sigma':
    return norm * transport_lib.path_coefficients(transport.path, t)[2]
  if form == 'constant':
    return norm * jnp.ones_like(t)
  raise errors.ConfigError(f'Unknown SDE diffusion form sample.sde_diffusion_form={form!r}; choose one of '
                           f'{SDE_DIFFUSION_FORMS}.')


def integrate_sde(predict, noise, rng, num_steps=250, transport=transport_lib.Transport(), diffusion_form='SBDM',
                  diffusion_norm=1.0, last_step='Mean', last_step_size=0.04):
  """SiT's SDE sampler: Euler-Maruyama from noise to data, then a last step.

  dx = [v(x, t) + w(t) score(x, t)] dt + sqrt(2 w(t)) dW, forward in SiT
  time on num_steps points linspace(t0, 1 - last_step_size) (t0 from
  transport.time_interval): num_steps - 1 stochastic steps, then the last
  step to t = 1 without noise: 'Mean' x + drift * size (SiT's default,
  size 0.04), 'Euler' x + v * size, 'Tweedie' x / alpha + sigma^2 / alpha
  * score, or None (no last step; the grid then ends at 1 - sample_eps).
  One model call per step: num_steps NFE (num_steps - 1 without a last step).

  Args:
    predict: (x, t, rng) -> the model's (guided) prediction, see
      make_prediction_fn; converted with transport.velocity_and_score.
    noise: [B, H, W, C] x(t0).
    rng: key; step k splits fold_in(rng, k) into its sample-id and noise keys.
  """
  if last_step not in SDE_LAST_STEPS:
    raise errors.ConfigError(f'Unknown SDE last step sample.sde_last_step={last_step!r}; choose one of '
                             f'{[name for name in SDE_LAST_STEPS if name]} or \'none\'.')
  size = last_step_size if last_step is not None else 0.0
  t0, t1 = transport_lib.time_interval(transport, sde=True, last_step_size=size, sampling=True)
  times = jnp.linspace(t0, t1, num_steps)

  def drift(x, t, key):
    velocity, score = transport_lib.velocity_and_score(predict(x, t, key), x, t, transport)
    return velocity, score, sde_diffusion(transport, t, diffusion_form, diffusion_norm)

  def step(k, x):
    t, dt = times[k], times[k + 1] - times[k]
    id_key, noise_key = jax.random.split(jax.random.fold_in(rng, k))
    velocity, score, w = drift(x, t, id_key)
    mean = x + (velocity + w * score) * dt
    return mean + jnp.sqrt(2.0 * w * dt) * jax.random.normal(noise_key, x.shape, x.dtype)

  x = jax.lax.fori_loop(0, num_steps - 1, step, noise)
  if last_step is None:
    return x
  velocity, score, w = drift(x, t1, jax.random.fold_in(rng, num_steps - 1))
  if last_step == 'Mean':
    return x + (velocity + w * score) * size
  if last_step == 'Euler':
    return x + velocity * size
  alpha, _, sigma, _ = transport_lib.path_coefficients(transport.path, jnp.asarray(t1))
  return x / alpha + sigma**2 / alpha * score


def integrate_adaptive(velocity, noise, rng, transport=transport_lib.Transport(), atol=1e-6, rtol=1e-3,
                       max_steps=4096):
  """SiT's default ODE sampler: adaptive Dormand-Prince 5(4) (diffrax).

  Integrates dx/dt = v from t0 to t1 (transport.time_interval) with a PID
  step-size controller (SiT: torchdiffeq dopri5, atol 1e-6, rtol 1e-3; both
  use an RMS error norm). The sample ids of a call come from the call's time.

  Returns:
    (x(t1) [B, H, W, C], nfe): nfe (int32 scalar) is the number of velocity
    evaluations actually made: 6 per attempted step (accepted or rejected;
    the FSAL tableau reuses its 7th stage) plus 1 for the first stage
    (checked against a counting vector field in the tests). An adaptive
    solver does not obey a step count.
  """
  import diffrax  # only this sampler needs it

  t0, t1 = transport_lib.time_interval(transport, sampling=True)

  def vector_field(t, x, args):
    key = jax.random.fold_in(rng, jax.lax.bitcast_convert_type(jnp.asarray(t, jnp.float32), jnp.int32))
    return velocity(x, t, key)

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), diffrax.Dopri5(), t0, t1, dt0=None, y0=noise,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
      saveat=diffrax.SaveAt(t1=True))
  nfe = 6 * solution.stats['num_steps'] + 1
  return solution.ys[-1], nfe
