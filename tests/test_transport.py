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


# --- paths and predictions against Gaussian closed forms -------------------

DATA_MEAN, DATA_STD = 1.5, 0.5


@pytest.mark.parametrize('path', transport.PATHS)
def test_path_velocity_is_the_time_derivative_and_ends_are_noise_and_data(path):
  x1, x0 = jnp.full((3, 1, 1, 1), 2.0), jnp.full((3, 1, 1, 1), -1.0)
  t = jnp.array([0.2, 0.5, 0.9])
  x_of_t = lambda t: transport.interpolate(x1, x0, t, path)[0]
  _, derivative = jax.jvp(x_of_t, (t,), (jnp.ones_like(t),))
  np.testing.assert_allclose(transport.interpolate(x1, x0, t, path)[1], derivative, rtol=1e-4)
  alpha, _, sigma, _ = transport.path_coefficients(path, jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(alpha[1], 1.0, atol=1e-6)
  np.testing.assert_allclose(sigma[1], 0.0, atol=1e-6)
  assert alpha[0] < 1e-2 and sigma[0] > 0.99  # VP: alpha(0) = exp(-5.05), not exactly 0
  if path != 'linear':  # variance preserving
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)


def gaussian_posterior(x, t, path):
  """Exact E[noise | x_t], velocity and score for data N(DATA_MEAN, DATA_STD^2)."""
  alpha, d_alpha, sigma, d_sigma = transport.path_coefficients(path, jnp.asarray(t))
  variance = alpha**2 * DATA_STD**2 + sigma**2
  centred = x - alpha * DATA_MEAN
  data = DATA_MEAN + alpha * DATA_STD**2 / variance * centred
  noise = sigma / variance * centred
  return noise, d_alpha * data + d_sigma * noise, -centred / variance


@pytest.mark.parametrize('path', transport.PATHS)
@pytest.mark.parametrize('t', [0.3, 0.8])
def test_every_prediction_converts_to_the_exact_velocity_and_score(path, t):
  x = jnp.linspace(-2.0, 3.0, 7).reshape(7, 1, 1, 1)
  noise, velocity, score = gaussian_posterior(x, t, path)
  for prediction, value in (('velocity', velocity), ('noise', noise), ('score', score)):
    v, s = transport.velocity_and_score(value, x, t, transport.Transport(path, prediction))
    np.testing.assert_allclose(v, velocity, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s, score, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('prediction', ['noise', 'score'])
@pytest.mark.parametrize('weight', [None, 'velocity', 'likelihood'])
def test_noise_and_score_losses_vanish_at_their_targets_inside_the_training_interval(prediction, weight):
  spec = transport.Transport('linear', prediction, weight)
  data = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
  noise = jax.random.normal(jax.random.PRNGKey(1), (4, 2, 2, 1))
  seen = {}

  def perfect(x_t, t):
    seen['t'] = t
    sigma = transport.path_coefficients('linear', t)[2][:, None, None, None]
    return noise if prediction == 'noise' else -noise / sigma

  loss = transport.training_loss(perfect, data, noise, jnp.array([0.0, 0.3, 0.7, 1.0]), spec)
  np.testing.assert_allclose(loss, 0.0, atol=1e-8)
  np.testing.assert_allclose(seen['t'], [1e-3, 1e-3 + 0.3 * 0.998, 1e-3 + 0.7 * 0.998, 1 - 1e-3], rtol=1e-6)
  wrong = transport.training_loss(lambda x_t, t: jnp.zeros_like(x_t), data, noise, jnp.array([0.5] * 4), spec)
  assert (wrong > 0).all()


def test_default_transport_keeps_the_linear_velocity_loss():
  data, noise, t = jnp.ones((2, 1, 1, 1)), jnp.zeros((2, 1, 1, 1)), jnp.array([0.0, 1.0])
  model_fn = lambda x_t, t: jnp.zeros_like(x_t)
  np.testing.assert_allclose(transport.training_loss(model_fn, data, noise, t), [1.0, 1.0])
  assert transport.time_interval(transport.Transport()) == (0.0, 1.0)
  assert transport.time_interval(transport.Transport(), sde=True, last_step_size=0.04, sampling=True) == (0.0, 0.96)
  with pytest.raises(ValueError, match='model.path'):
    transport.Transport(path='cosine')
