"""S_cross (docs/method.md, S_cross): 0 for pairs and uniform attention, a known value by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax.evaluation import s_cross


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _random_probs(seed, groups, heads, group_size, length):
  logits = _normal(seed, [groups, heads, group_size * length, group_size * length]) * 3
  return jax.nn.softmax(logits, axis=-1)


def test_pairs_score_zero():
  probs = _random_probs(0, 3, 2, 2, 5)
  np.testing.assert_allclose(s_cross.s_cross(probs, 2), 0.0, atol=1e-7)


def test_uniform_attention_scores_zero():
  n, length = 4, 3
  probs = jnp.full([2, 3, n * length, n * length], 1.0 / (n * length))
  np.testing.assert_allclose(s_cross.s_cross(probs, n), 0.0, atol=1e-7)
  q = jnp.zeros([2, n * length, 3, 8])  # zero logits: uniform attention
  k = _normal(1, q.shape)
  np.testing.assert_allclose(s_cross.s_cross_from_mass(s_cross.member_mass_from_qk(q, k, n)), 0.0, atol=1e-7)


def test_single_member_scores_zero():
  probs = _random_probs(2, 2, 1, 1, 4)
  np.testing.assert_array_equal(s_cross.s_cross(probs, 1), 0.0)


def test_hand_built_group_of_three():
  # One head, one token per member; row i = member i's attention over members.
  rows = jnp.array([[0.5, 0.4, 0.1],   # others renormalised: 0.8, 0.2 -> 0.8 - 0.5 = 0.3
                    [0.3, 0.4, 0.3],   # 0.5, 0.5 -> 0
                    [0.9, 0.1, 0.0]])  # 0.9, 0.1 -> 0.4
  probs = rows[None, None]  # [G=1, H=1, 3, 3]
  np.testing.assert_allclose(s_cross.member_mass(probs, 3)[0], rows, rtol=1e-6)
  np.testing.assert_allclose(s_cross.s_cross(probs, 3), [0.7 / 3], rtol=1e-6)


def test_mass_averages_heads_and_query_tokens_before_renormalising():
  # Group of 3, two tokens per member, two heads. Member 0's token/head rows put
  # all their mass on member 1 in three of four cases and on member 2 in one.
  n, length = 3, 2
  probs = np.zeros([1, 2, n * length, n * length])
  probs[0, :, :, 0] = 1.0  # members 1 and 2 attend member 0 only
  probs[0, 0, 0:2, :] = 0.0
  probs[0, 0, 0:2, 2] = 1.0  # head 0, both tokens of member 0 -> member 1 (token 2)
  probs[0, 1, 0, :] = 0.0
  probs[0, 1, 0, 3] = 1.0    # head 1, token 0 -> member 1 (token 3)
  probs[0, 1, 1, :] = 0.0
  probs[0, 1, 1, 4] = 1.0    # head 1, token 1 -> member 2
  mass = s_cross.member_mass(jnp.asarray(probs), n)
  np.testing.assert_allclose(mass[0, 0], [0, 0.75, 0.25])
  # Member 0: 0.75 - 0.5; members 1, 2: all mass on member 0 -> 1 - 0.5 each.
  np.testing.assert_allclose(s_cross.s_cross(jnp.asarray(probs), n), [(0.25 + 0.5 + 0.5) / 3],
                             rtol=1e-6)


def test_qk_path_matches_probabilities():
  groups, n, length, heads, dim = 2, 4, 5, 3, 8
  q = _normal(3, [groups, n * length, heads, dim])
  k = _normal(4, [groups, n * length, heads, dim])
  logits = jnp.einsum('gqhd,gkhd->ghqk', q, k) / np.sqrt(dim)
  probs = jax.nn.softmax(logits, axis=-1)  # [G, H, N*L, N*L]
  expected = s_cross.member_mass(probs, n)
  mass = s_cross.member_mass_from_qk(q, k, n)
  np.testing.assert_allclose(mass, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-5)
  score = s_cross.s_cross_from_mass(s_cross.member_mass_from_qk(q, k, n))
  np.testing.assert_allclose(score, s_cross.s_cross(probs, n), rtol=1e-5, atol=1e-6)
  assert score.shape == (groups,) and bool(jnp.all(score > 0))


def test_matches_attention_weights_of_jax_dot_product_attention():
  # The probabilities the model's attention uses: v = identity recovers them.
  groups, n, length, heads, dim = 1, 3, 2, 2, 6  # v = identity needs D = N*L
  q = _normal(5, [groups, n * length, heads, dim])
  k = _normal(6, [groups, n * length, heads, dim])
  eye = jnp.broadcast_to(jnp.eye(n * length)[None, :, None, :], [groups, n * length, heads, n * length])
  probs = jax.nn.dot_product_attention(q, k, eye, implementation='xla')  # [G, Q, H, K]
  np.testing.assert_allclose(s_cross.member_mass_from_qk(q, k, n),
                             s_cross.member_mass(probs.transpose(0, 2, 1, 3), n), rtol=1e-5, atol=1e-6)


def test_report_averages_masses_over_layers_before_scoring():
  layer_a = jnp.array([[[0, 1.0, 0], [0.5, 0, 0.5], [0.5, 0.5, 0]]])  # [G=1, 3, 3]
  layer_b = jnp.array([[[0, 0, 1.0], [0.5, 0, 0.5], [0.5, 0.5, 0]]])
  masses = jnp.stack([layer_a, layer_b])[None]  # [K=1 pass, 2 layers, G, N, N]
  report = s_cross.report(masses, [3, 5], [0], (0.0,), 3)
  # Averaged mass: member 0 splits evenly -> 0 everywhere.
  assert report['mean_percent'] == pytest.approx(0.0, abs=1e-5)
  # Per-layer scores: member 0 focuses fully (1 - 0.5) in each layer -> 0.5 / 3.
  assert report['per_layer_percent'] == {'3': pytest.approx(100 * 0.5 / 3), '5': pytest.approx(100 * 0.5 / 3)}
  assert report['self_mass_fraction'] == 0.0 and report['uniform_share'] == 0.5


def test_rejects_token_count_not_divisible_by_group_size():
  with pytest.raises(ValueError, match='N=4'):
    s_cross.member_mass(jnp.ones([1, 1, 6, 6]) / 6, 4)
