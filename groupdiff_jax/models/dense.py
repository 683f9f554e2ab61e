"""The dense layers' matmul, with a backward pass written as two plain 2-D matmuls.

`nn.Dense(..., dot_general=dense_dot_general)` computes what plain
`nn.Dense` computes (same parameters, same forward); only the gradient is
spelled differently. Differentiated by JAX, a dense layer on [B, L, C]
tokens has a weight gradient contracting two axes (B and L) of both
operands, which XLA CPU lowers by first transposing the [B*L, N] output
gradient in memory (a 25 MB copy for SiT-S/2's MLP, 16 images) and then
running a matmul outside its YNNPACK path. Here the tokens are flattened to
[B*L, C] first and the weight gradient is one matmul contracting their
leading axis, which XLA runs without that copy
(benchmarks/cpu_train_step.py, docs/benchmarks.md). The input gradient is
the usual dy . W^T.
"""

import jax
from jax import lax


@jax.custom_vjp
def dense_product(x, kernel):
  """x [..., K] . kernel [K, N] -> [..., N]."""
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _forward(x, kernel):
  return dense_product(x, kernel), (x, kernel)


def _backward(residuals, d_out):
  x, kernel = residuals
  flat_x, flat_d = x.reshape(-1, x.shape[-1]), d_out.reshape(-1, d_out.shape[-1])  # [T, K], [T, N]
  d_x = lax.dot_general(flat_d, kernel, (((1,), (1,)), ((), ())))  # [T, K]
  d_kernel = lax.dot_general(flat_x, flat_d, (((0,), (0,)), ((), ())))  # [K, N]
  return d_x.reshape(x.shape).astype(x.dtype), d_kernel.astype(kernel.dtype)


dense_product.defvjp(_forward, _backward)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for nn.Dense: `dense_product` for its usual contraction, lax.dot_general otherwise."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and not lhs_batch and not rhs_batch
      and rhs.ndim == 2 and precision is None and preferred_element_type is None and lhs.dtype == rhs.dtype):
    return dense_product(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)
