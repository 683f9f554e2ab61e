"""SiT transport: interpolant, intra-group time jitter, per-image loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax import transport


def test_interpolant_endpoints_and_velocity():
  data = jnp.full((2, 2, 2, 1), 3.0)
  noise = jnp.full((2, 2, 2, 1), -1.0)
  x_t, v = transport.interpolate(data, noise, jnp.array([0.0, 1.0]))
  np.testing.assert_array_equal(x_t[0], noise[0])  # t = 0 is noise
  np.testing.assert_array_equal(x_t[1], data[1])  # t = 1 is data
  np.testing.assert_array_equal(v, data - noise)


@pytest.mark.parametrize('jitter', [0.05, 0.1, 0.3])
def test_jitter_stays_within_bounds_around_a_shared_base(jitter):
  t = np.asarray(transport.sample_group_times(jax.random.PRNGKey(0), 2000, 4, jitter)).reshape(2000, 4)
  assert t.min() >= 0.0 and t.max() <= 1.0
  spread = t.max(1) - t.min(1)
  assert spread.max() <= 2 * jitter + 1e-6  # members within one +-jitter window
  assert spread.mean() > 0.5 * jitter  # ... and really spread inside it
  # clipping: every member lies in [base - jitter, base + jitter] ∩ [0, 1], so a
  # group never straddles more than the window.
  assert ((t.max(1) <= np.minimum(t.min(1) + 2 * jitter, 1.0) + 1e-6)).all()


def test_zero_jitter_shares_the_time_and_base_is_uniform():
  t = np.asarray(transport.sample_group_times(jax.random.PRNGKey(1), 5000, 4, 0.0)).reshape(5000, 4)
  assert (t == t[:, :1]).all()
  assert abs(t[:, 0].mean() - 0.5) < 0.02 and abs(t[:, 0].var() - 1 / 12) < 0.005


def test_jitter_window_is_clipped_at_the_ends():
  # With jitter 1.0 the window is all of [0, 1] for every base time.
  t = np.asarray(transport.sample_group_times(jax.random.PRNGKey(2), 4000, 2, 1.0))
  assert t.min() >= 0 and t.max() <= 1 and abs(t.mean() - 0.5) < 0.02


def test_loss_on_a_hand_computed_case():
  data = jnp.array([[[[1.0], [2.0]]], [[[0.0], [0.0]]]])  # [2, 1, 2, 1]
  noise = jnp.array([[[[0.0], [1.0]]], [[[1.0], [-1.0]]]])
  t = jnp.array([0.5, 0.25])

  def model_fn(x_t, t):
    # A learned-sigma output of 2 channels; the loss must use channel 0 only.
    return jnp.concatenate([jnp.ones_like(x_t), 100 * jnp.ones_like(x_t)], axis=-1)

  losses = transport.training_loss(model_fn, data, noise, t)
  # targets: image 0: [1, 1] -> errors [0, 0]; image 1: [-1, 1] -> errors [2, 0]
  np.testing.assert_allclose(np.asarray(losses), [0.0, (4.0 + 0.0) / 2])


def test_model_sees_the_interpolated_input():
  data = jnp.ones((1, 1, 1, 1)) * 2.0
  noise = jnp.zeros((1, 1, 1, 1))
  seen = {}

  def model_fn(x_t, t):
    seen['x'], seen['t'] = x_t, t
    return jnp.zeros_like(x_t)

  loss = transport.training_loss(model_fn, data, noise, jnp.array([0.75]))
  assert float(seen['x'].squeeze()) == 1.5 and float(seen['t'][0]) == 0.75
  assert float(loss[0]) == 4.0  # target velocity 2, prediction 0
