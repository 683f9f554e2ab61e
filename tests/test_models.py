"""The DiT/SiT backbone and GroupDiff's group attention and sample embedding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax.models import dit, embeddings, group_attention
from tests import reference_dit

TINY = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=4, num_classes=5)


def tiny_model(**overrides):
  return dit.DiT(**{**TINY, 'learn_sigma': False, 'max_group_size': 4, **overrides})


def random_params(model, seed=0, batch=8):
  """Every leaf random (adaLN-Zero would otherwise hide bugs): shapes from jax.eval_shape of the init, values
  from NumPy (no initialiser or PRNG program to compile)."""
  x = jnp.zeros((batch, model.input_size, model.input_size, model.in_channels))
  ids = jnp.zeros((batch,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), x, jnp.zeros(batch), ids, ids)['params']
  rng = np.random.default_rng(seed + 1)
  return jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32), shapes)


@pytest.fixture(scope='module')
def params():
  """random_params(tiny_model()), shared by the module's tests (none changes them)."""
  return random_params(tiny_model())


def inputs(batch=8, seed=2, num_classes=5, max_group_size=4):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 8, 8, 3)).astype(np.float32)
  t = rng.uniform(0, 1, batch).astype(np.float32)
  y = rng.integers(0, num_classes + 1, batch).astype(np.int32)
  ids = rng.integers(0, max_group_size, batch).astype(np.int32)
  return x, t, y, ids



@pytest.mark.parametrize('group_size', [1, 4])
def test_matches_independent_numpy_reference(group_size, params):
  model = tiny_model()
  x, t, y, ids = inputs()
  out = model.apply({'params': params}, x, t, y, ids, group_size=group_size)
  reference = lambda p, xx: reference_dit.dit_forward(p, xx.transpose(0, 3, 1, 2), t, y, ids, patch_size=2,
                                                      num_heads=4, out_channels=3, group_size=group_size)
  assert_close_to_reference(out, reference, jax.tree.map(np.asarray, params), x)


F32_EPS = 2.0**-24  # unit roundoff of float32
STAGES_PER_BLOCK = 16  # adaLN modulation, norm, q/k/v, scores, softmax, weighted sum, proj, MLP in/act/out, residuals


def assert_close_to_reference(out, reference, params, x):
  """float32 `out` against the float64 `reference(params, x)` [B, C, H, W], within a derived float32 bound.

  First-order error analysis: each float32 rounding is a relative
  perturbation of at most u = 2^-24 of an operand, so the float32 output
  differs from the exact one by at most the sum, over the network's
  sequential rounding stages, of the output's response to a u-perturbation
  of that stage's operands. The response is measured in float64 on the
  reference for the parameters and the input (every entry times 1 + u r,
  r ~ U[-1, 1]) and scaled by the number of stages: STAGES_PER_BLOCK per
  block plus as many for the embedders and final layer. One atol (the
  largest response) for every element, since rounding in attention and
  LayerNorm mixes all positions.
  """
  ref = reference(params, x.astype(np.float64))
  rng = np.random.default_rng(7)
  bump = lambda a: np.asarray(a, np.float64) * (1 + F32_EPS * rng.uniform(-1, 1, np.shape(a)))
  response = np.abs(reference(jax.tree.map(bump, params), bump(x)) - ref).max()
  stages = STAGES_PER_BLOCK * (TINY['depth'] + 1)
  assert response > 0
  np.testing.assert_allclose(np.asarray(out), ref.transpose(0, 2, 3, 1), rtol=0, atol=stages * response)


def test_group_size_one_without_sample_embedding_is_baseline_dit():
  """max_group_size=0 and group size 1: exactly the baseline DiT (the reference with no sample table)."""
  model = tiny_model(max_group_size=0)
  params = random_params(model)
  assert 'sample_embedder' not in params
  x, t, y, _ = inputs()
  out = model.apply({'params': params}, x, t, y, None, group_size=1)
  reference = lambda p, xx: reference_dit.dit_forward(p, xx.transpose(0, 3, 1, 2), t, y, None, patch_size=2,
                                                      num_heads=4, out_channels=3)
  assert_close_to_reference(out, reference, jax.tree.map(np.asarray, params), x)
  # ... and the group machinery with group size 1 is the same computation.
  with_switch_off = model.apply({'params': params}, x, t, y, None, group_size=4, group_attention=False)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(with_switch_off))


def test_permuting_members_with_their_ids_permutes_outputs(params):
  model = tiny_model()
  x, t, y, ids = inputs()
  perm = np.array([2, 0, 3, 1, 7, 5, 4, 6])  # within each group of 4
  out = model.apply({'params': params}, x, t, y, ids, group_size=4)
  out_perm = model.apply({'params': params}, x[perm], t[perm], y[perm], ids[perm], group_size=4)
  np.testing.assert_allclose(np.asarray(out)[perm], np.asarray(out_perm), rtol=1e-4, atol=1e-4)


def test_groups_do_not_influence_each_other(params):
  """Moving the other group's images leaves a group's outputs bit for bit; moving members of its own does not."""
  model = tiny_model()
  x, t, y, ids = inputs()
  shift = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)

  def output(x, group_size, moved):
    x = x.copy()
    x[moved] += shift[moved]
    return np.asarray(model.apply({'params': params}, x, t, y, ids, group_size=group_size))

  out = output(x, 4, slice(0, 0))
  np.testing.assert_array_equal(output(x, 4, slice(4, 8))[:4], out[:4])  # group 1 has no influence on group 0
  assert np.abs(output(x, 4, slice(1, 4))[0] - out[0]).max() > 0  # members of group 0 do influence each other
  # Per-image attention: member 0 sees only itself.
  np.testing.assert_array_equal(output(x, 1, slice(1, 8))[0], output(x, 1, slice(0, 0))[0])


def test_switched_off_equals_per_image_attention(params):
  model = tiny_model()
  x, t, y, ids = inputs()
  off = model.apply({'params': params}, x, t, y, ids, group_size=4, group_attention=False)
  per_image = model.apply({'params': params}, x, t, y, ids, group_size=1)
  np.testing.assert_array_equal(np.asarray(off), np.asarray(per_image))
  on = model.apply({'params': params}, x, t, y, ids, group_size=4)
  assert np.abs(np.asarray(on) - np.asarray(per_image)).max() > 1e-3


def test_group_layers_limit_group_attention_to_a_block_range(params):
  x, t, y, ids = inputs()
  only_first = tiny_model(group_layers=(0, 1))
  out = only_first.apply({'params': params}, x, t, y, ids, group_size=4)
  # Reference: the numpy model with group attention only in block 0 is not
  # directly expressible, so check the two limits and the leakage pattern.
  none = tiny_model(group_layers=(3, 3)).apply({'params': params}, x, t, y, ids, group_size=4)
  per_image = tiny_model().apply({'params': params}, x, t, y, ids, group_size=1)
  np.testing.assert_array_equal(np.asarray(none), np.asarray(per_image))
  assert np.abs(np.asarray(out) - np.asarray(per_image)).max() > 1e-4
  assert 0 in dit.GroupAttentionSwitch(0, 1) and 1 not in dit.GroupAttentionSwitch(0, 1)
  assert 27 in dit.GroupAttentionSwitch(9, None) and 8 not in dit.GroupAttentionSwitch(9, None)


def test_sample_embedding_joins_the_conditioning(params):
  model = tiny_model()
  x, t, y, ids = inputs()
  a = model.apply({'params': params}, x, t, y, ids, group_size=1)
  b = model.apply({'params': params}, x, t, y, (ids + 1) % 4, group_size=1)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  with pytest.raises(ValueError, match='sample_ids'):
    model.apply({'params': params}, x, t, y, None)


@functools.lru_cache(maxsize=None)  # SiT-XL/2 is counted by two tests: traced once
def count_params(variant, learn_sigma=True, max_group_size=0):
  model = dit.DiT(**dit.parse_variant(variant), learn_sigma=learn_sigma, max_group_size=max_group_size)
  x = jnp.zeros((1, 32, 32, 4))
  ids = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros(1), ids, ids)
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def expected_count(depth, hidden, patch, in_ch=4, out_ch=8, classes=1000, sample_rows=0, tokens=None):
  """Parameter count from the architecture's formula (pos_embed excluded)."""
  c = hidden
  per_block = (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c) + (6 * c * c + 6 * c)
  embed = patch * patch * in_ch * c + c + (256 * c + c) + (c * c + c) + (classes + 1) * c + sample_rows * c
  final = (2 * c * c + 2 * c) + (c * patch * patch * out_ch + patch * patch * out_ch)
  return embed + depth * per_block + final


@pytest.mark.parametrize('size', ['S', 'B', 'L', 'XL'])
@pytest.mark.parametrize('patch', [2, 4, 8])
def test_parameter_count_of_every_size(size, patch):
  depth, hidden, _ = dit.MODEL_SIZES[size]
  assert count_params(f'SiT-{size}/{patch}') == expected_count(depth, hidden, patch)


def test_sit_xl2_has_the_official_675m_parameters_plus_the_sample_table():
  # DiT/SiT report 675,129,632 including the fixed 256 x 1152 pos_embed buffer.
  pos_embed = 256 * 1152
  assert count_params('SiT-XL/2') + pos_embed == 675_129_632
  assert count_params('SiT-XL/2', max_group_size=4) == count_params('SiT-XL/2') + 4 * 1152


def test_parse_variant_rejects_unknown_names():
  assert dit.parse_variant('DiT-B/4') == dict(depth=12, hidden_size=768, num_heads=12, patch_size=4)
  with pytest.raises(ValueError, match='SiT-XXL/2'):
    dit.parse_variant('SiT-XXL/2')


def test_group_reshape_round_trip_and_error():
  x = jnp.arange(8 * 5 * 3).reshape(8, 5, 3)
  g = group_attention.to_groups(x, 4)
  assert g.shape == (2, 20, 3)
  np.testing.assert_array_equal(g[1, 5:10], x[5])  # member 1 of group 1
  np.testing.assert_array_equal(group_attention.from_groups(g, 4), x)
  with pytest.raises(ValueError, match='groups of 3'):
    group_attention.to_groups(x, 3)


def test_sample_ids_are_permutations_within_groups():
  ids = np.asarray(embeddings.draw_sample_ids(jax.random.PRNGKey(0), 50, 4, 4)).reshape(50, 4)
  assert all(sorted(row) == [0, 1, 2, 3] for row in ids)
  lone = np.asarray(embeddings.draw_sample_ids(jax.random.PRNGKey(1), 4000, 1, 4))
  np.testing.assert_allclose(np.bincount(lone, minlength=4) / 4000, 0.25, atol=0.03)
  partial = np.asarray(embeddings.draw_sample_ids(jax.random.PRNGKey(2), 100, 2, 8)).reshape(100, 2)
  assert (partial[:, 0] != partial[:, 1]).all() and partial.max() == 7
  fixed = np.asarray(embeddings.draw_sample_ids(jax.random.PRNGKey(0), 3, 4, 4, fixed=True))
  np.testing.assert_array_equal(fixed, np.tile(np.arange(4), 3))
  with pytest.raises(ValueError, match='max_group_size'):
    embeddings.draw_sample_ids(jax.random.PRNGKey(0), 1, 5, 4)


def test_adaln_zero_init_outputs_zero():
  model = tiny_model()
  x, t, y, ids = inputs()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x, t, y, ids)['params']
  assert np.abs(np.asarray(model.apply({'params': params}, x, t, y, ids, group_size=4))).max() == 0.0
