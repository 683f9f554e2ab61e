"""SiT transport objective: linear interpolant, velocity prediction.

Time runs from noise to data as in SiT: x_t = t * x_1 + (1 - t) * x_0 with
x_0 ~ N(0, I) the noise and x_1 the data, so t = 0 is pure noise, t = 1 is
clean data, and the target velocity is d x_t / dt = x_1 - x_0. Training t is
uniform in [0, 1] (SiT's train_eps is 0 for the linear path).
"""

import jax
import jax.numpy as jnp


def interpolate(x_data, noise, t):
  """x_t and the velocity target. x_data, noise: [B, ...]; t: [B]."""
  t = t.reshape(t.shape + (1,) * (x_data.ndim - 1))
  return t * x_data + (1.0 - t) * noise, x_data - noise


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


def training_loss(model_fn, x_data, noise, t):
  """Per-image SiT loss.

  Args:
    model_fn: (x_t [B, H, W, C], t [B]) -> prediction [B, H, W, C'] with
      C' >= C; only the first C channels (the velocity) are used, as SiT
      drops a learned-sigma half.
    x_data: [B, H, W, C] clean latents.
    noise: [B, H, W, C] standard normal.
    t: [B] times in [0, 1].

  Returns:
    [B] per-image losses. The step takes their plain mean over the batch,
    as the official GroupDiff code does; the paper writes the group loss as
    a sum over members, which differs only by the constant factor N.
  """
  x_t, target = interpolate(x_data, noise, t)
  prediction = model_fn(x_t, t)[..., :x_data.shape[-1]]
  return per_image_loss(prediction, target)
