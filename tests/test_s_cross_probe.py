"""S_cross probe: the masses it recomputes from a DiT pass equal those of the attention probabilities."""

import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax.evaluation import s_cross
from groupdiff_jax.models import dit, group_attention

TINY = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=4, num_classes=5,
            learn_sigma=False, max_group_size=4)


def model_params_inputs(batch=8, seed=0, **overrides):
  model = dit.DiT(**{**TINY, **overrides})
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, 8, 8, 3)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 1, batch), jnp.float32)
  y = jnp.asarray(rng.integers(0, 6, batch), jnp.int32)
  ids = jnp.asarray(np.concatenate([rng.permutation(4) for _ in range(batch // 4)]), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), x, t, y, ids)['params']
  # Random everywhere (adaLN-Zero init would hide bugs); NumPy, so no per-leaf compilation.
  params = jax.tree.map(lambda leaf: jnp.asarray(0.2 * rng.standard_normal(leaf.shape), jnp.float32), shapes)
  return model, params, (x, t, y, ids)


def explicit_probabilities(model, params, inputs, group_size):
  """Run the model with an attention that materialises and records softmax(q k^T / sqrt(D)) [B', H, T, T]."""
  recorded = []
  original = group_attention.dot_product_attention

  def explicit(q, k, v, implementation='xla'):
    del implementation
    logits = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(logits, axis=-1)
    recorded.append(probs)
    return jnp.einsum('bhts,bshd->bthd', probs, v)

  def run(params, inputs):
    recorded.clear()
    return model.apply({'params': params}, *inputs, group_size=group_size), list(recorded)

  group_attention.dot_product_attention = explicit
  try:
    out, recorded = jax.jit(run)(params, inputs)  # traced with the explicit attention
  finally:
    group_attention.dot_product_attention = original
  return recorded, out


def test_masses_match_explicit_probabilities_in_every_layer():
  model, params, inputs = model_params_inputs()
  probs, out = explicit_probabilities(model, params, inputs, 4)
  apply = jax.jit(model.apply, static_argnames='group_size')
  np.testing.assert_allclose(out, apply({'params': params}, *inputs, group_size=4), rtol=1e-4, atol=1e-4)
  layers, mass = s_cross.member_masses(model, params, *inputs, group_size=4)
  np.testing.assert_array_equal(layers, [0, 1, 2])
  assert mass.shape == (3, 2, 4, 4) and len(probs) == 3
  np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-5)
  for layer, p in enumerate(probs):
    assert p.shape == (2, 4, 64, 64)  # [G, H, N*L, N*L]
    np.testing.assert_allclose(mass[layer], s_cross.member_mass(p, 4), atol=1e-5)
    np.testing.assert_allclose(s_cross.s_cross_from_mass(mass[layer]), s_cross.s_cross(p, 4), atol=1e-5)
  assert float(s_cross.s_cross_from_mass(mass).max()) > 1e-3  # random weights: members are singled out


def test_pairs_score_zero():
  model, params, inputs = model_params_inputs()
  layers, mass = s_cross.member_masses(model, params, *inputs, group_size=2)
  assert mass.shape == (3, 4, 2, 2)
  np.testing.assert_allclose(s_cross.s_cross_from_mass(mass), 0.0, atol=1e-7)
  assert float(mass[:, :, 0, 1].min()) > 0  # but the members do attend to each other


def test_only_blocks_with_group_attention_are_covered():
  model, params, inputs = model_params_inputs(group_layers=(0, 1))
  layers, mass = s_cross.member_masses(model, params, *inputs, group_size=4)
  np.testing.assert_array_equal(layers, [0])
  full_model = dit.DiT(**TINY)
  _, full_mass = s_cross.member_masses(full_model, params, *inputs, group_size=4)
  np.testing.assert_allclose(mass[0], full_mass[0], atol=1e-6)  # block 0 sees the same input either way
  layers, mass = s_cross.member_masses(model, params, *inputs, group_size=4, group_attention_on=False)
  assert layers.shape == (0,) and mass.shape == (0, 2, 4, 4)


def test_report_over_stages_and_layers():
  model, params, inputs = model_params_inputs()
  x, t, y, ids = inputs
  stages = [s_cross.member_masses(model, params, x, t * s, y, ids, group_size=4)[1] for s in (1.0, 0.5)]
  mass = jnp.stack(stages)  # [2 stages, 3 layers, G, N, N]
  report = s_cross.report(mass, [0, 1, 2], [0, 1], (0.0, 0.5), 4)
  assert list(report['per_stage_percent']) == ['0', '0.5'] and list(report['per_layer_percent']) == ['0', '1', '2']
  mean = s_cross.s_cross_from_mass(mass.mean((0, 1))).mean()  # masses averaged over stages and layers, then scored
  np.testing.assert_allclose(report['mean_percent'], 100 * mean, rtol=1e-5)
  np.testing.assert_allclose(report['per_stage_layer_percent']['0.5']['2'],
                             100 * s_cross.s_cross_from_mass(stages[1][2]).mean(), rtol=1e-5)


def test_the_probe_leaves_the_models_output_unchanged():
  model, params, inputs = model_params_inputs()
  plain = model.apply({'params': params}, *inputs, group_size=4)
  sown, state = model.apply({'params': params}, *inputs, group_size=4, mutable=['intermediates'])
  np.testing.assert_array_equal(plain, sown)
  assert sorted(state['intermediates']) == ['blocks_0', 'blocks_1', 'blocks_2']
  _, state = model.apply({'params': params}, *inputs, group_size=1, mutable=['intermediates'])
  assert not state.get('intermediates')  # per-image attention sows nothing
