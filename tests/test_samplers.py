"""SiT ODE samplers, classifier-free guidance and group inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from groupdiff_jax import sample, samplers
from groupdiff_jax.models import dit

MEAN, STD = 1.5, 0.5


def gaussian_velocity(x, t, rng):
  """Exact velocity E[x1 - x0 | x_t] for data N(MEAN, STD^2), noise N(0, 1)."""
  var = t**2 * STD**2 + (1 - t)**2
  centred = x - t * MEAN
  return MEAN + (t * STD**2 - (1 - t)) / var * centred


def flow_error(method, steps):
  noise = jnp.linspace(-2, 2, 9).reshape(9, 1, 1, 1)
  out = samplers.integrate_ode(gaussian_velocity, noise, jax.random.PRNGKey(0), steps, method)
  return float(jnp.abs(out - (MEAN + STD * noise)).max())  # the exact flow map is affine


def test_euler_and_heun_converge_to_the_exact_flow_at_their_orders():
  euler = [flow_error('euler', n) for n in (20, 40, 80)]
  heun = [flow_error('heun', n) for n in (20, 40, 80)]
  assert euler[2] < 0.02 and heun[2] < 1e-4
  np.testing.assert_allclose(euler[0] / euler[1], 2.0, rtol=0.25)  # first order
  np.testing.assert_allclose(heun[0] / heun[1], 4.0, rtol=0.25)  # second order
  assert heun[0] < euler[0] / 5


def test_nfe_counts():
  assert samplers.number_of_function_evaluations(125, 'heun') == 250
  assert samplers.number_of_function_evaluations(250, 'euler') == 250
  with pytest.raises(ValueError, match='rk4'):
    samplers.integrate_ode(gaussian_velocity, jnp.zeros((1, 1, 1, 1)), jax.random.PRNGKey(0), 2, 'rk4')


def test_combine_guidance_all_or_first_channels():
  cond = jnp.full((1, 1, 1, 4), 2.0)
  uncond = jnp.zeros((1, 1, 1, 4))
  np.testing.assert_array_equal(samplers.combine_guidance(cond, uncond, 1.5), jnp.full((1, 1, 1, 4), 3.0))
  legacy = samplers.combine_guidance(cond, uncond, 1.5, guided_channels=3)
  np.testing.assert_array_equal(legacy[0, 0, 0], [3.0, 3.0, 3.0, 2.0])  # 4th channel: conditional only


NULL = 10


def probe_apply(variables, x, t, y, ids, group_size=1, group_attention=True):
  """A fake model whose output encodes how it was called."""
  code = jnp.where(y == NULL, 1000.0, 0.0) + 10.0 * group_size + 1.0 * group_attention
  return jnp.zeros_like(x) + code[:, None, None, None]


def velocity_at(t, **guidance):
  labels = jnp.array([3, 3, 3, 3], jnp.int32)
  fn = samplers.make_velocity_fn(probe_apply, {}, labels, samplers.GuidanceConfig(**guidance), null_class=NULL,
                                 max_group_size=4, data_channels=1)
  return float(jax.jit(fn)(jnp.zeros((4, 1, 1, 1)), t, jax.random.PRNGKey(0))[0, 0, 0, 0])


def test_groupdiff_l_inference_branches():
  # cond: per image (10*1 + 1); uncond: null class, group of 4 (1000 + 40 + 1)
  cond, uncond, s = 11.0, 1041.0, 2.0
  kw = dict(cfg_scale=s, cond_group_size=1, uncond_group_size=4)
  assert velocity_at(0.5, **kw) == pytest.approx(uncond + s * (cond - uncond))
  # outside the guidance interval: the conditional branch alone
  assert velocity_at(0.1, guidance_low=0.25, guidance_high=0.75, **kw) == cond
  assert velocity_at(0.3, guidance_low=0.25, guidance_high=0.75, **kw) == pytest.approx(uncond + s * (cond - uncond))
  # scale 1: no unconditional branch at all
  assert velocity_at(0.5, cfg_scale=1.0, cond_group_size=1, uncond_group_size=4) == cond


def test_groupdiff_f_and_stage_window():
  kw = dict(cfg_scale=3.0, cond_group_size=4, uncond_group_size=4, group_stage_fraction=0.4)
  early_cond, early_uncond = 41.0, 1041.0  # group attention on
  late_cond, late_uncond = 40.0, 1040.0  # switched off after 40% of the trajectory
  assert velocity_at(0.2, **kw) == pytest.approx(early_uncond + 3.0 * (early_cond - early_uncond))
  assert velocity_at(0.6, **kw) == pytest.approx(late_uncond + 3.0 * (late_cond - late_uncond))


def test_images_must_be_whole_groups_of_both_branches():
  with pytest.raises(ValueError, match='multiple of both group sizes'):
    samplers.make_velocity_fn(probe_apply, {}, jnp.zeros(6, jnp.int32), samplers.GuidanceConfig(uncond_group_size=4),
                              null_class=NULL, max_group_size=4, data_channels=1)


def sample_config(**kw):
  config = default.get_config().sample
  config.update(dict(sampler='euler', num_steps=4, num_groups=2, images_per_group=4, cond_group_size=1,
                     uncond_group_size=4, cfg_scale=2.0, guidance_low=0.0, guidance_high=1.0, guided_channels=0,
                     group_stage_fraction=1.0, fixed_sample_ids=True, use_ema=True))
  config.update(kw)
  return config


def model_config(**kw):
  config = default.get_config().model
  config.update(dict(input_size=8, in_channels=1, num_classes=10, max_group_size=4))
  config.update(kw)
  return config


def test_a_group_is_generated_jointly_and_groups_stay_apart(tiny_dit):
  tiny_model = model_config()
  model, params = tiny_dit
  labels = sample.group_labels(2, 4, 10)
  np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1, 1, 1])
  guidance = samplers.guidance_from_config(sample_config())

  def final(guidance):
    """A jitted run noise -> image: compiled once per guidance, used for both noises."""
    fn = samplers.make_velocity_fn(model.apply, params, labels, guidance, null_class=10, max_group_size=4,
                                   data_channels=1)
    run = jax.jit(lambda noise: samplers.integrate_ode(fn, noise, jax.random.PRNGKey(2), 4, 'euler'))
    return lambda noise: np.asarray(run(noise))

  noise = jax.random.normal(jax.random.PRNGKey(3), (8, 8, 8, 1))
  moved = noise.at[1].add(1.0)  # change member 1 of group 0
  grouped = final(guidance)
  base, changed = grouped(noise), grouped(moved)
  assert np.abs(base[0] - changed[0]).max() > 1e-6  # member 0 sees member 1 (unconditional group of 4)
  np.testing.assert_array_equal(base[4:], changed[4:])  # group 1 does not
  alone = final(samplers.GuidanceConfig(cfg_scale=2.0, cond_group_size=1, uncond_group_size=1, fixed_sample_ids=True))
  np.testing.assert_array_equal(alone(noise)[0], alone(moved)[0])  # baseline: independent
  images = sample.generate(model, params, jax.random.PRNGKey(0), sample_config(), tiny_model)
  assert images.shape == (8, 8, 8, 1) and np.isfinite(np.asarray(images)).all()


# --- DiT: DDPM / DDIM through the same guided model function ----------------

def probe_apply_learned_sigma(variables, x, t, y, ids, group_size=1, group_attention=True):
  """Like probe_apply, with a second half (variance values) of -code."""
  code = probe_apply(variables, x, t, y, ids, group_size, group_attention)
  return jnp.concatenate([code, -code], axis=-1)


def denoise_at(t_model, **guidance):
  labels = jnp.array([3, 3, 3, 3], jnp.int32)
  fn = samplers.make_denoise_fn(probe_apply_learned_sigma, {}, labels, samplers.GuidanceConfig(**guidance),
                                jax.random.PRNGKey(0), null_class=NULL, max_group_size=4, data_channels=1)
  out = jax.jit(fn)(jnp.zeros((4, 1, 1, 1)), jnp.full((4,), t_model, jnp.int32))
  return float(out[0, 0, 0, 0]), float(out[0, 0, 0, 1])


def test_dit_eps_is_guided_and_the_learned_variance_comes_from_the_conditional_branch():
  cond, uncond, s = 11.0, 1041.0, 1.65
  eps, variance = denoise_at(999, cfg_scale=s, cond_group_size=1, uncond_group_size=4)
  assert eps == pytest.approx(uncond + s * (cond - uncond))
  assert variance == -cond  # not guided, not the unconditional branch's -1041


def test_dit_guidance_interval_and_stage_window_use_the_noise_level_t_over_1000():
  cond, uncond, s = 11.0, 1041.0, 2.0
  kw = dict(cfg_scale=s, cond_group_size=1, uncond_group_size=4, guidance_low=0.5, guidance_high=1.0)
  # official GroupDiff DiT: guided iff 0.5 * 1000 <= t <= 1.0 * 1000 (t = 999 is noise)
  assert denoise_at(999, **kw)[0] == pytest.approx(uncond + s * (cond - uncond))
  assert denoise_at(500, **kw)[0] == pytest.approx(uncond + s * (cond - uncond))
  assert denoise_at(499, **kw) == (cond, -cond)
  # group attention during the first 40% from the noise end: t > 600
  stage = dict(cfg_scale=s, cond_group_size=4, uncond_group_size=4, group_stage_fraction=0.4)
  assert denoise_at(700, **stage)[0] == pytest.approx(1041.0 + s * (41.0 - 1041.0))
  assert denoise_at(300, **stage)[0] == pytest.approx(1040.0 + s * (40.0 - 1040.0))


@pytest.fixture(scope='module')
def tiny_dit():
  """(model, params): a tiny learned-sigma DiT with every leaf moved off its init, shared by the module."""
  model = dit.DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                  learn_sigma=True, max_group_size=4)
  @jax.jit
  def init(key):
    params = model.init(key, jnp.zeros((1, 8, 8, 1)), jnp.zeros(1), jnp.zeros(1, jnp.int32),
                        jnp.zeros(1, jnp.int32))['params']
    return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  return model, init(jax.random.PRNGKey(0))


def test_guided_ddpm_at_scale_1_equals_the_unguided_sampler(tiny_dit):
  method = 'ddpm'
  from groupdiff_jax import diffusion as gd
  model, params = tiny_dit
  labels = jnp.array([1, 1, 1, 1, 2, 2, 2, 2], jnp.int32)
  schedule = gd.create_schedule('10')
  noise = jax.random.normal(jax.random.PRNGKey(3), (8, 8, 8, 1))
  guidance = samplers.GuidanceConfig(cfg_scale=1.0, cond_group_size=1, uncond_group_size=4, fixed_sample_ids=True)
  denoise = samplers.make_denoise_fn(model.apply, params, labels, guidance, jax.random.PRNGKey(4), null_class=10,
                                     max_group_size=4, data_channels=1)
  guided = jax.jit(lambda x, r: samplers.sample_diffusion(denoise, x, r, schedule, method))(noise, jax.random.key(5))
  ids = jnp.zeros(8, jnp.int32)  # fixed ids of groups of 1
  plain_fn = lambda x, t: model.apply({'params': params}, x, t, labels, ids)
  sample_fn = gd.ddpm_sample if method == 'ddpm' else gd.ddim_sample
  plain = jax.jit(lambda x, r: sample_fn(plain_fn, x, r, schedule))(noise, jax.random.key(5))
  np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_dit_sample_job_dispatches_by_objective(tiny_dit):
  model, params = tiny_dit
  tiny_model = model_config(learn_sigma=True, objective='dit')
  images = sample.generate(model, params, jax.random.PRNGKey(0), sample_config(sampler='ddim', num_steps=5),
                           tiny_model)
  assert images.shape == (8, 8, 8, 1) and np.isfinite(np.asarray(images)).all()
  with pytest.raises(ValueError, match='does not fit model.objective'):
    sample.generate(model, params, jax.random.PRNGKey(0), sample_config(sampler='heun'), tiny_model)
  assert sample.timestep_respacing(sample_config(num_steps=250)) == '250'


# --- SiT SDE (Euler-Maruyama) and adaptive dopri5 ---------------------------

def test_dopri5_reaches_the_exact_flow_and_reports_the_nfe_it_used():
  calls = []

  def counted_velocity(x, t, rng):
    jax.debug.callback(lambda: calls.append(1))
    return gaussian_velocity(x, t, rng)

  noise = jnp.linspace(-2, 2, 9).reshape(9, 1, 1, 1)
  for tolerance, max_error in ((None, 0.05), (1e-6, 1e-5)):
    calls.clear()
    kw = {} if tolerance is None else dict(atol=tolerance, rtol=tolerance)  # None: SiT's 1e-6 / 1e-3
    out, nfe = jax.jit(lambda n: samplers.integrate_adaptive(counted_velocity, n, jax.random.PRNGKey(0), **kw))(noise)
    jax.effects_barrier()
    assert float(jnp.abs(out - (MEAN + STD * noise)).max()) < max_error
    assert int(nfe) == len(calls)
  assert int(nfe) > 30  # the tight tolerance needed more steps


@pytest.mark.parametrize('form', ['SBDM', 'sigma'])
def test_sde_sampler_reaches_the_gaussian_data_moments(form):
  noise = jax.random.normal(jax.random.PRNGKey(0), (4000, 1, 1, 1))
  out = jax.jit(lambda n: samplers.integrate_sde(gaussian_velocity, n, jax.random.PRNGKey(1), 250,
                                                 diffusion_form=form))(noise)
  out = np.asarray(out).ravel()
  assert np.isfinite(out).all()
  assert abs(out.mean() - MEAN) < 0.03 and abs(out.std() - STD) < 0.03


def test_sde_last_step_and_diffusion_forms():
  from groupdiff_jax import transport
  linear = transport.Transport()
  # SBDM on the linear path: w = (1 - t) / t, clamped near the noise end
  np.testing.assert_allclose(samplers.sde_diffusion(linear, jnp.float32(0.25)), 3.0, rtol=1e-6)
  np.testing.assert_allclose(samplers.sde_diffusion(linear, jnp.float32(0.0)), 999.0, rtol=1e-3)
  np.testing.assert_allclose(samplers.sde_diffusion(linear, jnp.float32(0.25), 'sigma'), 0.75, rtol=1e-6)
  # No last step: the deterministic part alone is checked with a zero-noise SDE (diffusion norm 0)
  noise = jnp.linspace(-2, 2, 9).reshape(9, 1, 1, 1)
  out = samplers.integrate_sde(gaussian_velocity, noise, jax.random.PRNGKey(0), 250, diffusion_norm=0.0)
  np.testing.assert_allclose(out, MEAN + STD * noise, atol=0.02)  # Euler 250 steps + the Mean step of 0.04
  with pytest.raises(ValueError, match='last step'):
    samplers.integrate_sde(gaussian_velocity, noise, jax.random.PRNGKey(0), 4, last_step='Heun')


def test_sit_sample_job_runs_the_sde_and_dopri5_samplers(tiny_dit):
  model, params = tiny_dit
  tiny_model = model_config(learn_sigma=True, objective='sit')
  images, nfe = sample.generate_with_nfe(model, params, jax.random.PRNGKey(0), sample_config(sampler='sde', num_steps=6),
                                         tiny_model)
  assert images.shape == (8, 8, 8, 1) and np.isfinite(np.asarray(images)).all() and nfe == 6
  images, nfe = sample.generate_with_nfe(model, params, jax.random.PRNGKey(0), sample_config(sampler='dopri5'),
                                         tiny_model)
  assert images.shape == (8, 8, 8, 1) and np.isfinite(np.asarray(images)).all() and nfe >= 7
