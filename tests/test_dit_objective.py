"""The DiT objective in the group train step and the DiT configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import digits, dit_b, dit_xl
from groupdiff_jax import step_plan
from groupdiff_jax import train_step as ts
from groupdiff_jax.data.digits import load_digits
from groupdiff_jax.models import dit


def tiny_dit_config(**model):
  config = digits.get_config()
  config.model.update(dict(variant='DiT-S/2', objective='dit', depth=2, hidden_size=32, num_heads=2, input_size=8))
  config.model.update(model)
  return config


def test_configs_select_the_dit_objective_and_the_official_sampling_recipe():
  for config, variant in ((dit_xl.get_config(), 'DiT-XL/2'), (dit_b.get_config(), 'DiT-B/2')):
    assert config.model.variant == variant and config.model.objective == 'dit' and config.model.learn_sigma
    s = config.sample
    assert (s.sampler, s.num_steps, s.cfg_scale, s.guidance_low, s.guidance_high) == ('ddpm', 250, 1.65, 0.0, 1.0)
    assert (s.cond_group_size, s.uncond_group_size, s.guided_channels) == (1, 4, 0)
    assert config.data.name == 'latents' and config.data.latent_dir and config.train.group_ratio == 0.1
    assert config.model.dtype == 'bfloat16'  # the SiT-XL recipe's precision and data settings
  assert digits.get_config().model.objective == 'sit'


def test_dit_step_feeds_integer_timesteps_shared_within_a_group():
  seen = {}

  def spy_apply(variables, x, t, y, ids, group_size=1, group_attention=True):
    seen.update(t=np.asarray(t), y=np.asarray(y), group_size=group_size)
    return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],))

  config = tiny_dit_config()
  sub = step_plan.SubBatch(32, 4, False)
  with jax.disable_jit():
    losses = ts._sub_batch_loss({}, spy_apply, sub, jnp.zeros((32, 2, 2, 1)), jnp.zeros(32, jnp.int32),
                                jax.random.PRNGKey(0), config.train, 0, 10, config.model)
  t = seen['t'].reshape(8, 4)
  assert seen['t'].dtype == np.int32 and t.min() >= 0 and t.max() <= 999 and t.max() > 100
  assert (t == t[:, :1]).all()  # timestep_jitter 0: one timestep per group
  assert (seen['y'] == 10).all() and seen['group_size'] == 4
  assert losses.shape == (32,) and np.isfinite(np.asarray(losses)).all()


def test_dit_objective_needs_learned_sigma():
  config = tiny_dit_config()

  def no_sigma_apply(variables, x, t, y, ids, group_size=1, group_attention=True):
    return jnp.zeros_like(x)  # what a learn_sigma=False model outputs: eps only

  with pytest.raises(ValueError, match='learn_sigma=True'):
    jax.jit(lambda x: ts._sub_batch_loss({}, no_sigma_apply, step_plan.SubBatch(4, 1, True), x,
                                         jnp.zeros(4, jnp.int32), jax.random.PRNGKey(0), config.train,
                                         0, 10, config.model))(jnp.zeros((4, 2, 2, 1)))


@pytest.fixture(scope='module')
def dit_state():
  """(config, model, fresh TrainState) of a one-block DiT-objective model: one jitted initialisation shared by the
  module's tests."""
  config = tiny_dit_config(depth=1)
  model = dit.model_from_config(config.model)
  return config, model, jax.jit(functools.partial(ts.create_train_state, model, config))(jax.random.PRNGKey(0))


def test_a_few_dit_steps_on_digits_lower_the_loss(dit_state):
  config, model, state = dit_state
  params = state.params
  images, labels = load_digits(8)
  images, labels = jnp.asarray(images[:32]), jnp.asarray(labels[:32])
  sub = step_plan.SubBatch(32, 1, True)
  tx = optax.adam(3e-3)

  def loss_fn(params, rng):
    return jnp.mean(ts._sub_batch_loss(params, model.apply, sub, images, labels, rng, config.train, 4, 10,
                                       config.model))

  def held_out_loss(params):  # the same 4 keys before and after training
    return jnp.mean(jax.vmap(lambda k: loss_fn(params, jax.random.PRNGKey(1000 + k)))(jnp.arange(4)))

  @jax.jit
  def train(params):
    def step(carry, i):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, jax.random.PRNGKey(i))
      updates, opt_state = tx.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    (trained, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(25))
    return held_out_loss(params), held_out_loss(trained)

  before, after = (float(v) for v in train(params))
  assert np.isfinite(after) and after < 0.8 * before, (before, after)


def test_sit_path_and_prediction_reach_the_loss_from_the_model_config():
  seen = {}

  def spy_apply(variables, x, t, y, ids, group_size=1, group_attention=True):
    seen['t'] = np.asarray(t)
    return jnp.zeros_like(x)

  config = tiny_dit_config(objective='sit')
  with config.model.unlocked():
    config.model.path, config.model.prediction = 'gvp', 'noise'
  losses = ts._sub_batch_loss({}, spy_apply, step_plan.SubBatch(256, 1, True), jnp.zeros((256, 2, 2, 1)),
                              jnp.zeros(256, jnp.int32), jax.random.PRNGKey(0), config.train, 0, 10, config.model)
  assert seen['t'].min() >= 1e-3 and seen['t'].max() <= 1 - 1e-3  # SiT's train_eps for noise models
  # zero noise prediction on zero data: the loss is the noise's second moment
  assert abs(float(losses.mean()) - 1.0) < 0.15


def test_the_jitted_train_step_of_the_trainer_uses_the_configured_objective(dit_state):
  """make_jitted_train_step (what train.py runs) passes the model config down."""
  from groupdiff_jax import sharding
  config, _, state = dit_state
  config = config.copy_and_resolve_references()
  config.train.batch_size = 8
  kind = step_plan.step_kinds(8, 4, 0.25, mixed_steps=False)['groups']
  rng = np.random.default_rng(0)
  batch = ({'images': rng.standard_normal((8, 8, 8, 1)).astype(np.float32),
            'labels': rng.integers(0, 10, 8).astype(np.int32)},)
  step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, 0), 0)

  def loss_with(model_config):
    return float(jax.jit(lambda params: ts._sub_batch_loss(
        params, state.apply_fn, kind[0], batch[0]['images'], batch[0]['labels'], step_rng, config.train,
        config.model.max_group_size, 10, model_config).mean())(state.params))

  sit_model = config.model.copy_and_resolve_references()
  sit_model.objective = 'sit'
  dit_loss, sit_loss = loss_with(config.model), loss_with(sit_model)
  mesh = sharding.make_mesh()
  run = ts.make_jitted_train_step(config, mesh, sharding.replicated(mesh))
  _, metrics = run(jax.tree.map(jnp.copy, state), batch, kind)  # a copy: the step donates its state
  np.testing.assert_allclose(float(metrics['loss']), dit_loss, rtol=1e-5)
  assert abs(dit_loss - sit_loss) > 1e-3
