"""Official GroupDiff / REPA SiT weights (their t = 1 is noise, velocity noise - data) under our samplers.

Facts from the official code (Dalby1379/GroupDiff): transport/path.py ICPlan
has x_t = (1 - t) x_data + t x_noise and the target d x_t / dt = noise - data;
the Denoiser embeds t in [0, 1] as it is (no * 1000). The model adapter
(`model.time_convention = 'groupdiff_official'`) feeds the network 1 - t and
negates its data channels.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from configs import default, eval_gdiff_sit_xl
from groupdiff_jax import convert, converted, samplers, transport
from groupdiff_jax.models import dit
from tests import test_convert

OFFICIAL = 'groupdiff_official'
MEAN, STD = 1.5, 0.5


# ---------------------------------------------------------------- (1) the mapping, on a real network


@pytest.mark.parametrize('learn_sigma', [False, True])
def test_adapted_model_at_t_is_minus_the_official_network_at_one_minus_t(learn_sigma):
  sd = test_convert.official_state_dict(seed=5, learn_sigma=learn_sigma)
  raw = test_convert.tiny_model(learn_sigma=learn_sigma)
  adapted = dit.DiT(**test_convert.TINY, learn_sigma=learn_sigma, max_group_size=4, time_convention=OFFICIAL)
  params, _ = convert.convert_state_dict(sd, raw)
  x, _, y, ids = test_convert.inputs()
  t = np.random.default_rng(0).uniform(0, 1, 8)  # our time: 0 = noise
  x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)
  ours = jax.jit(adapted.apply)({'params': params}, x_nhwc, jnp.asarray(t, jnp.float32), y, ids)
  net = jax.jit(raw.apply)({'params': params}, x_nhwc, jnp.asarray(1 - t, jnp.float32), y, ids)
  np.testing.assert_allclose(ours[..., :4], -net[..., :4], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours[..., 4:], net[..., 4:], rtol=1e-6, atol=1e-6)  # learned sigma: not negated
  # ... and against the official PyTorch-layout forward at the official time s = 1 - t.
  official = test_convert.official_forward(sd, x, 1 - t, y, ids, patch=2, num_heads=4)
  channels = official.shape[1]
  sign = np.where(np.arange(channels) < 4, -1.0, 1.0)[None, :, None, None]
  test_convert.assert_matches(ours, sign * official)


def test_config_builds_the_adapter_only_where_it_is_exact():
  config = default.get_config().model
  config.update(dict(variant='SiT-S/2', input_size=8, in_channels=4, num_classes=5, learn_sigma=False,
                     max_group_size=4, time_convention=OFFICIAL))
  assert dit.model_from_config(config).time_convention == OFFICIAL
  assert dit.model_from_config(eval_gdiff_sit_xl.get_config().model).time_convention == OFFICIAL
  assert dit.model_from_config(default.get_config().model).time_convention == 'sit'
  for field, value in (('objective', 'dit'), ('prediction', 'noise'), ('path', 'vp')):
    with pytest.raises(ValueError, match=f"'{field}': '{value}'"):
      dit.model_from_config(ml_collections.ConfigDict({**config.to_dict(), field: value}))
  with pytest.raises(ValueError, match='model.time_convention=.reverse'):
    dit.model_from_config(ml_collections.ConfigDict({**config.to_dict(), 'time_convention': 'reverse'}))


# ---------------------------------------------------------------- (2) closed-form official network, our samplers


def official_gaussian_network(x, s):
  """Exact official prediction E[noise - data | x_s] for data N(MEAN, STD^2), x_s = (1 - s) data + s noise."""
  s = s.reshape((-1,) + (1,) * (x.ndim - 1))
  var = (1 - s) ** 2 * STD**2 + s**2
  centred = x - (1 - s) * MEAN
  data = MEAN + (1 - s) * STD**2 / var * centred
  noise = s / var * centred
  return noise - data


def apply_fn(convention):
  """A `model.apply` stand-in: the official closed-form network behind the model's convention adapter."""
  def apply(variables, x, t, y, sample_ids=None, group_size=1, group_attention=True):
    del variables, y, sample_ids, group_size, group_attention
    out = official_gaussian_network(x, dit.network_time(t, convention))
    return dit.prediction_from_network(out, convention, x.shape[-1])
  return apply


def velocity_fn(convention):
  labels = jnp.zeros((1,), jnp.int32)
  fn = samplers.make_velocity_fn(apply_fn(convention), {}, labels, samplers.GuidanceConfig(), null_class=10,
                                 max_group_size=0, data_channels=1)
  return lambda x, t, rng: fn(x, t, rng)


NOISE = jnp.linspace(-2, 2, 9).reshape(9, 1, 1, 1)  # the exact flow map is x -> MEAN + STD x


def test_ode_samplers_through_the_adapter_follow_the_exact_flow():
  for method, steps, tolerance in (('euler', 80, 0.02), ('heun', 40, 1e-3)):
    out = samplers.integrate_ode(velocity_fn(OFFICIAL), NOISE, jax.random.PRNGKey(0), steps, method)
    np.testing.assert_allclose(out, MEAN + STD * NOISE, atol=tolerance)
  out, _ = jax.jit(lambda n: samplers.integrate_adaptive(velocity_fn(OFFICIAL), n, jax.random.PRNGKey(0)))(NOISE)
  np.testing.assert_allclose(out, MEAN + STD * NOISE, atol=0.05)
  # Without the adapter the same network runs backwards and misses the data by far.
  wrong = samplers.integrate_ode(velocity_fn('sit'), NOISE, jax.random.PRNGKey(0), 40, 'heun')
  assert float(jnp.abs(wrong - (MEAN + STD * NOISE)).max()) > 0.5


def test_sde_sampler_through_the_adapter_reaches_the_data_moments():
  noise = jax.random.normal(jax.random.PRNGKey(0), (4000, 1, 1, 1))
  out = jax.jit(lambda n: samplers.integrate_sde(velocity_fn(OFFICIAL), n, jax.random.PRNGKey(1), 250,
                                                 transport.Transport()))(noise)
  out = np.asarray(out).ravel()
  assert np.isfinite(out).all()
  assert abs(out.mean() - MEAN) < 0.03 and abs(out.std() - STD) < 0.03


def test_training_loss_of_the_exact_official_network_is_the_irreducible_minimum():
  """Our trainer's loss through the adapter: the exact network beats the same network unadapted."""
  rng = np.random.default_rng(0)
  data = jnp.asarray(MEAN + STD * rng.standard_normal((20000, 1, 1, 1)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((20000, 1, 1, 1)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 1, 20000), jnp.float32)

  def loss(convention):
    model_fn = lambda x, time: apply_fn(convention)({}, x, time, None)
    return float(transport.training_loss(model_fn, data, noise, t).mean())

  # The exact network's loss is the irreducible E_t Var(v | x_t) of v = data - noise (Gaussian regression).
  grid = np.linspace(0, 1, 10001)
  covariance = grid * STD**2 - (1 - grid)  # Cov(v, x_t)
  irreducible = np.mean(1 + STD**2 - covariance**2 / (grid**2 * STD**2 + (1 - grid) ** 2))
  np.testing.assert_allclose(loss(OFFICIAL), irreducible, rtol=0.03)
  assert loss('sit') > 3 * irreducible


# ---------------------------------------------------------------- (3) the converter declares the convention


def groupdiff_sit_file(tmp_path):
  """A GroupDiff SiT training checkpoint in the official layout: model / model_ema under `denoiser.`."""
  sd = test_convert.official_state_dict(seed=6, learn_sigma=False, max_group_size=4)
  flat = {f'{container}.denoiser.{k}': v for container in ('model', 'model_ema') for k, v in sd.items()}
  path = tmp_path / 'gdiff-l-4-sit.safetensors'
  safetensors.numpy.save_file(flat, str(path))
  return path


def test_groupdiff_sit_file_converts_with_the_official_convention(tmp_path):
  report = test_convert.convert_file(groupdiff_sit_file(tmp_path), tmp_path / 'sit')
  assert report.weights == 'model_ema'
  assert report.architecture['learn_sigma'] is False and report.architecture['max_group_size'] == 4
  assert report.architecture['time_convention'] == OFFICIAL
  assert converted.read_conversion_record(tmp_path / 'sit')['architecture']['time_convention'] == OFFICIAL
  # DiT-layout files (learned sigma) keep ours; the flag overrides the inference.
  dit_file = test_convert.save(test_convert.official_state_dict(), tmp_path, 'safetensors', 'dit')
  assert test_convert.convert_file(dit_file, tmp_path / 'dit').architecture['time_convention'] == 'sit'
  forced = test_convert.convert_file(groupdiff_sit_file(tmp_path), tmp_path / 'forced', time_convention='sit')
  assert forced.architecture['time_convention'] == 'sit'


def test_a_config_that_disagrees_with_the_conversion_record_is_an_error(tmp_path):
  test_convert.convert_file(groupdiff_sit_file(tmp_path), tmp_path / 'sit')
  matching = default.get_config().model
  matching.update(dict(learn_sigma=False, max_group_size=4, time_convention=OFFICIAL))
  converted.check_model_config(tmp_path / 'sit', matching)
  converted.check_model_config(tmp_path, default.get_config().model)  # no converted.json: nothing to check
  with pytest.raises(ValueError) as info:
    converted.check_model_config(tmp_path / 'sit', default.get_config().model)
  message = str(info.value)
  assert f'--config.model.time_convention={OFFICIAL}' in message and 'model.learn_sigma' in message
  assert 'max_group_size' not in message
