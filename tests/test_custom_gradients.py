"""Hand-written gradients of the backbone: the dense layers' matmul (models/dense.py) and the MLP's GELU
(dit.gelu_tanh) compute the plain forward and its exact derivatives."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax.models.dense import dense_dot_general, dense_product
from groupdiff_jax.models.dit import gelu_tanh

EPS32 = float(np.finfo(np.float32).eps)


def within_dot_error_bound(out, a, b, contract, eps=EPS32):
  """|out - a.b| <= n u sum|a||b| (n terms, u = eps/2: the classical bound for a sum of products rounded at
  each step), the exact product and the bound computed in float64 with NumPy. contract: (axes of a, of b)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  exact = np.tensordot(a, b, contract)
  bound = np.tensordot(np.abs(a), np.abs(b), contract)
  terms = np.prod([a.shape[axis] for axis in contract[0]])
  np.testing.assert_array_less(np.abs(np.asarray(out, np.float64) - exact), terms * eps / 2 * bound + 1e-30)


@pytest.mark.parametrize('shape', [(24, 16), (3, 8, 16)])  # [T, K] and [B, L, K] tokens
@pytest.mark.parametrize('features', [40, 8])  # wider and narrower than the input
def test_value_and_gradients_are_the_matmul_and_its_exact_derivatives(shape, features):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], shape)
  kernel = jax.random.normal(keys[1], (shape[-1], features))
  d_out = jax.random.normal(keys[2], shape[:-1] + (features,))
  out, pullback = jax.vjp(dense_product, x, kernel)
  d_x, d_kernel = pullback(d_out)
  lead = tuple(range(x.ndim - 1))
  within_dot_error_bound(out, x, kernel, ((x.ndim - 1,), (0,)))
  within_dot_error_bound(d_x, d_out, kernel, ((x.ndim - 1,), (1,)))  # dL/dx = d_out . kernel^T
  within_dot_error_bound(d_kernel, x, d_out, (lead, lead))  # dL/dkernel = sum over tokens of x^T d_out
  assert d_x.shape == x.shape and d_kernel.shape == kernel.shape


def test_dense_layer_keeps_its_parameters_and_forward():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 12))
  plain = nn.Dense(7, name='fc')
  ours = nn.Dense(7, dot_general=dense_dot_general, name='fc')
  params = plain.init(jax.random.PRNGKey(2), x)
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(2), x)) == jax.tree.structure(params)
  np.testing.assert_array_equal(np.asarray(ours.apply(params, x)), np.asarray(plain.apply(params, x)))
  grad = lambda layer: jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply(p, x))))(params)
  for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(plain))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_gives_bfloat16_gradients():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 6, 8), jnp.bfloat16)
  kernel = jax.random.normal(jax.random.PRNGKey(4), (8, 16), jnp.bfloat16)
  d_out = jax.random.normal(jax.random.PRNGKey(5), (4, 6, 16), jnp.bfloat16)
  d_x, d_kernel = jax.vjp(dense_product, x, kernel)[1](d_out)
  assert d_x.dtype == jnp.bfloat16 and d_kernel.dtype == jnp.bfloat16
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  within_dot_error_bound(d_x, d_out, kernel, ((2,), (1,)), eps)
  within_dot_error_bound(d_kernel, x, d_out, ((0, 1), (0, 1)), eps)


def test_other_contractions_fall_back_to_lax_dot_general():
  a, b = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 2))
  numbers = (((2,), (1,)), ((0,), (0,)))  # batched
  np.testing.assert_array_equal(np.asarray(dense_dot_general(a, b, numbers)),
                                np.asarray(jax.lax.dot_general(a, b, numbers)))


def test_gelu_is_the_tanh_approximation_and_its_derivative():
  x = jnp.linspace(-6.0, 6.0, 1201)
  np.testing.assert_array_equal(np.asarray(gelu_tanh(x)), np.asarray(jax.nn.gelu(x, approximate=True)))
  # Derivative of 0.5 x (1 + tanh(s (x + a x^3))), in float64 from its formula.
  xs, s, a = np.asarray(x, np.float64), np.sqrt(2 / np.pi), 0.044715
  t = np.tanh(s * (xs + a * xs**3))
  exact = 0.5 * (1 + t) + 0.5 * xs * (1 - t**2) * s * (1 + 3 * a * xs**2)
  grad = jax.vmap(jax.grad(gelu_tanh))(x)
  # float32 rounding: a few ulps of each term; 1 - t^2 cancels (absolute error ~2 eps) and is multiplied by
  # 0.5 |x| s (1 + 3 a x^2).
  bound = 8 * EPS32 * (1 + np.abs(xs) * s * (1 + 3 * a * xs**2))
  np.testing.assert_array_less(np.abs(np.asarray(grad, np.float64) - exact), bound)
  autodiff = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=True)))(x)
  np.testing.assert_array_less(np.abs(np.asarray(autodiff, np.float64) - exact), bound)  # the bound is JAX's too
