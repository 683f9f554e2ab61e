"""S_cross on the sampler's own trajectory: the probe sees what the guided unconditional branch used."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from groupdiff_jax import errors, samplers
from groupdiff_jax.evaluation import s_cross
from groupdiff_jax.models import dit
from groupdiff_jax.models.embeddings import draw_sample_ids

TINY = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=4, num_classes=5,
            learn_sigma=False, max_group_size=4)
FLOAT32_ATOL = 1e-5  # float32 rounding over a few steps of a tiny model with outputs of order 1


def tiny_setup(batch=8, seed=0, **overrides):
  model = dit.DiT(**{**TINY, **overrides})
  rng = np.random.default_rng(seed)
  noise = jnp.asarray(rng.standard_normal((batch, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, batch), jnp.int32)
  ids = jnp.zeros((batch,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), noise, jnp.zeros((batch,)), labels, ids)['params']
  params = jax.tree.map(lambda leaf: jnp.asarray(0.2 * rng.standard_normal(leaf.shape), jnp.float32), shapes)
  return model, params, noise, labels


def configs(**sample):
  config = default.get_config()
  with config.unlocked():
    for key, value in TINY.items():
      if key in config.model:
        config.model[key] = value
    config.sample.sampler = 'euler'
    config.sample.num_steps = 4
    config.sample.cfg_scale = 2.0
    config.sample.cond_group_size = 1
    config.sample.uncond_group_size = 4
    for key, value in sample.items():
      config.sample[key] = value
  return config.model, config.sample


def test_guided_model_draws_its_unconditional_ids_with_branch_sample_ids():
  model, params, x, labels = tiny_setup()
  guidance = samplers.GuidanceConfig(cfg_scale=2.0, cond_group_size=1, uncond_group_size=4)
  key = jax.random.PRNGKey(7)
  guided = samplers.make_guided_model_fn(model.apply, params, labels, guidance, null_class=5, max_group_size=4,
                                         data_channels=3)(x, jnp.full((8,), 0.3), 0.7, key)
  cond_rng, uncond_rng = samplers.branch_rngs(key)
  t = jnp.full((8,), 0.3)
  cond = model.apply({'params': params}, x, t, labels, samplers.branch_sample_ids(cond_rng, 8, 1, 4), group_size=1)
  uncond = model.apply({'params': params}, x, t, jnp.full((8,), 5),
                       samplers.branch_sample_ids(uncond_rng, 8, 4, 4), group_size=4)
  np.testing.assert_allclose(guided, uncond + 2.0 * (cond - uncond), atol=FLOAT32_ATOL)


def test_stepwise_sampler_equals_one_uninterrupted_run_with_fixed_ids():
  model, params, noise, labels = tiny_setup()
  model_config, sample_config = configs(fixed_sample_ids=True, sampler='heun')
  sample = s_cross.make_trajectory_sampler(model, model_config, sample_config)
  x, record = sample(params, noise, labels, jax.random.PRNGKey(0), probe_images=8)
  velocity = samplers.make_velocity_fn(model.apply, params, labels, samplers.guidance_from_config(sample_config),
                                       null_class=5, max_group_size=4, data_channels=3)
  expected = samplers.integrate_ode(velocity, noise, jax.random.PRNGKey(0), 4, 'heun')
  np.testing.assert_allclose(x, expected, atol=FLOAT32_ATOL)
  assert record['probed'] == [True] * 4 and record['layers'] == [0, 1, 2]
  assert record['masses'].shape == (4, 3, 2, 4, 4)


def test_probe_uses_the_held_state_time_and_the_ids_of_the_step():
  model, params, noise, labels = tiny_setup()
  model_config, sample_config = configs()
  sample = s_cross.make_trajectory_sampler(model, model_config, sample_config)
  key = jax.random.PRNGKey(3)
  _, record = sample(params, noise, labels, key, probe_images=4)
  # Step 0: x = the noise, t = 0; integrate_ode's one step gave the velocity fold_in(fold_in(key, 0), 0).
  _, uncond_rng = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 0), 0))
  ids = draw_sample_ids(uncond_rng, 2, 4, 4)[:4]  # drawn for the whole batch, the first group probed
  _, mass = s_cross.member_masses(model, params, noise[:4], jnp.zeros((4,)), jnp.full((4,), 5), ids,
                                        group_size=4)
  np.testing.assert_allclose(record['masses'][0], mass, atol=FLOAT32_ATOL)
  other_ids = draw_sample_ids(jax.random.PRNGKey(99), 1, 4, 4)
  _, other = s_cross.member_masses(model, params, noise[:4], jnp.zeros((4,)), jnp.full((4,), 5), other_ids,
                                         group_size=4)
  assert not np.allclose(record['masses'][0], other, atol=FLOAT32_ATOL)  # the ids matter: the check can fail


@pytest.mark.parametrize('sample, probed', [
    (dict(group_stage_fraction=0.4, num_steps=10), [True] * 4 + [False] * 6),  # t < 0.4
    (dict(guidance_low=0.25, guidance_high=0.75, num_steps=8), [False, False, True, True, True, True, True, False]),
    (dict(cfg_scale=1.0), [False] * 4),  # no unconditional branch
])
def test_only_steps_that_run_the_grouped_unconditional_branch_are_probed(sample, probed):
  model, params, noise, labels = tiny_setup()
  model_config, sample_config = configs(**sample)
  _, record = s_cross.make_trajectory_sampler(model, model_config, sample_config)(
      params, noise, labels, jax.random.PRNGKey(0), probe_images=4)
  assert record['probed'] == probed
  assert len(record['masses']) == sum(probed)


def test_removed_layers_are_not_covered():
  """The blocks covered are member_masses' (the sampler's record passes them on: the stepwise test above)."""
  model, params, noise, _ = tiny_setup(group_layers=(1, None))
  layers, mass = s_cross.member_masses(model, params, noise[:4], jnp.zeros((4,)), jnp.full((4,), 5),
                                       jnp.arange(4, dtype=jnp.int32), group_size=4)
  assert np.asarray(layers).tolist() == [1, 2] and mass.shape == (2, 1, 4, 4)


def test_report_of_hand_made_masses():
  # N = 3; member 0 keeps 0.5 and splits the rest 0.4 / 0.1 (a = 0.8, 0.2: focus 0.8 - 0.5 = 0.3); members 1 and 2
  # keep 0.5 and split the rest evenly (focus 0). Two probed steps (t = 0, 0.5), one layer, one group.
  mass = np.asarray([[0.5, 0.4, 0.1], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]], np.float32)
  even = np.full((3, 3), 1 / 3, np.float32)
  record = {'steps_t': [0.0, 0.25, 0.5, 0.75], 'probed': [True, False, True, False], 'layers': [2],
            'masses': np.stack([mass, even])[:, None, None]}  # [2, 1, 1, 3, 3]
  report = s_cross.trajectory_report(record, (0.0, 0.5), 3)
  assert report['per_step_percent'] == [pytest.approx(10.0), None, pytest.approx(0.0), None]  # 0.3 / 3 members
  assert report['per_stage_percent'] == {'0': pytest.approx(10.0), '0.5': pytest.approx(0.0)}
  # Averaged masses: member 0 puts (0.4 + 1/3) / 2 and (0.1 + 1/3) / 2 on the others, the rest stay even.
  top_share = (0.4 + 1 / 3) / (0.5 + 2 / 3)
  assert report['mean_percent'] == pytest.approx(100 * (top_share - 0.5) / 3, rel=1e-5)
  assert report['per_layer_percent'] == {'2': pytest.approx(report['mean_percent'])}
  assert report['self_mass_fraction'] == pytest.approx((0.5 + 1 / 3) / 2)
  assert report['uniform_share'] == 0.5
  counts = report['share_histogram']['counts']
  assert sum(counts) == 2 * 3 * 2  # steps x members x others
  assert counts[16] == 1 and counts[4] == 1 and counts[10] == 10  # a = 0.8, 0.2 and ten times 0.5


def test_nothing_probed_gives_an_empty_report():
  record = {'steps_t': [0.0, 0.5], 'probed': [False, False], 'layers': None, 'masses': np.zeros((0,))}
  report = s_cross.trajectory_report(record, (0.0, 0.5), 4)
  assert report['mean_percent'] is None and report['per_stage_percent'] == {'0': None, '0.5': None}


def test_a_dit_model_is_refused_with_a_config_error():
  model, _, _, _ = tiny_setup()
  model_config, sample_config = configs()
  with model_config.unlocked():
    model_config.objective = 'dit'
  with pytest.raises(errors.ConfigError, match='objective'):
    s_cross.make_trajectory_sampler(model, model_config, sample_config)
