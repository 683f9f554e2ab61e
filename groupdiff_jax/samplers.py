"""SiT ODE samplers with classifier-free guidance and group inference.

Time runs from t = 0 (noise) to t = 1 (data), as in transport.py.

GroupDiff-l (official): the conditional branch runs with `cond_group_size`
(1: each image alone) and the unconditional branch with
`uncond_group_size` (e.g. 4: the group jointly):
    v_i = v_u(X)_i + s * (v_c(x_i) - v_u(X)_i)
inside the guidance interval [guidance_low, guidance_high], and the
conditional output alone outside it. GroupDiff-f groups both branches.
Group attention can be limited to the first `group_stage_fraction` of the
trajectory (the noisy part, where the paper finds it matters).

Sample ids are drawn afresh for every model call, as in the official code,
unless fixed ids are asked for.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from groupdiff_jax.models.embeddings import draw_sample_ids

SAMPLERS = ('euler', 'heun')


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
  """How the velocity of a batch of groups is computed at time t.

  cfg_scale: s; 1.0 runs the conditional branch only.
  guidance_low, guidance_high: SiT times where guidance applies.
  guided_channels: None guides every channel; 3 guides the first three as
    the official DiT/SiT/GroupDiff code ("legacy" CFG).
  cond_group_size, uncond_group_size: group sizes of the two branches.
  group_stage_fraction: group attention only while t < this (1.0: always).
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
      guidance_high=sample_config.guidance_high, guided_channels=sample_config.get('guided_channels') or None,
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


def make_velocity_fn(apply_fn, params, labels, guidance, *, null_class, max_group_size, data_channels):
  """velocity(x [B,H,W,C], t scalar, rng) -> [B,H,W,C] with CFG and groups.

  `labels` [B] holds the class of every image; B must be a whole number of
  groups of both branches' sizes.
  """
  num_images = labels.shape[0]
  for size in (guidance.cond_group_size, guidance.uncond_group_size):
    if num_images % size:
      raise ValueError(f'{num_images} images are not whole groups of {size}; '
                       'make the number of images a multiple of both group sizes.')
  null_labels = jnp.full_like(labels, null_class)

  def branch(x, t, branch_labels, group_size, rng, group_attention):
    ids = None
    if max_group_size > 0:
      ids = draw_sample_ids(rng, num_images // group_size, group_size, max_group_size, guidance.fixed_sample_ids)
    t_batch = jnp.full((num_images,), t, jnp.float32)
    out = apply_fn({'params': params}, x, t_batch, branch_labels, ids, group_size=group_size,
                   group_attention=group_attention)
    return out[..., :data_channels]

  def velocity_with(group_attention):
    def fn(x, t, rng):
      cond_rng, uncond_rng = jax.random.split(rng)
      cond = branch(x, t, labels, guidance.cond_group_size, cond_rng, group_attention)
      if guidance.cfg_scale == 1.0:
        return cond

      def guided(_):
        uncond = branch(x, t, null_labels, guidance.uncond_group_size, uncond_rng, group_attention)
        return combine_guidance(cond, uncond, guidance.cfg_scale, guidance.guided_channels)

      in_interval = (t >= guidance.guidance_low) & (t <= guidance.guidance_high)
      return jax.lax.cond(in_interval, guided, lambda _: cond, None)
    return fn

  with_groups, without_groups = velocity_with(True), velocity_with(False)
  if guidance.group_stage_fraction >= 1.0:
    return with_groups
  if guidance.group_stage_fraction <= 0.0:
    return without_groups

  def velocity(x, t, rng):
    return jax.lax.cond(t < guidance.group_stage_fraction, with_groups, without_groups, x, t, rng)

  return velocity


def integrate_ode(velocity, noise, rng, num_steps, method='euler'):
  """Integrate dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).

  Args:
    velocity: (x, t, rng) -> dx/dt.
    noise: [B, H, W, C] starting point x(0).
    rng: key; step k uses fold_in(rng, k) (for the sample ids).
    num_steps: uniform steps; Euler makes num_steps velocity evaluations,
      Heun (predictor-corrector on every step) 2 * num_steps.
    method: 'euler' or 'heun'.

  Returns:
    x(1), [B, H, W, C].
  """
  if method not in SAMPLERS:
    raise ValueError(f'Unknown sample.sampler={method!r}; choose one of {SAMPLERS}.')
  dt = 1.0 / num_steps

  def step(k, x):
    t = k * dt
    key = jax.random.fold_in(rng, k)
    v = velocity(x, t, key)
    if method == 'euler':
      return x + dt * v
    x_pred = x + dt * v
    v_next = velocity(x_pred, t + dt, jax.random.fold_in(key, 1))
    return x + 0.5 * dt * (v + v_next)

  return jax.lax.fori_loop(0, num_steps, step, noise)


def number_of_function_evaluations(num_steps, method):
  """Model evaluations per branch of an `integrate_ode` call."""
  return num_steps if method == 'euler' else 2 * num_steps
