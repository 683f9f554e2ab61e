"""Cross-sample attention score S_cross (METHOD.md section 4, our reading).

The paper reports S_cross (Table 1; 0.00% at group size 2) and its
correlation with FID, but the official code does not compute it. Our reading:
for one group of N members with L tokens each,

  A_ij = attention mass that member i's queries put on member j's keys,
         averaged over heads and i's query tokens (and over layers / sampling
         steps when aggregated);
  a_ij = A_ij / sum_{j' != i} A_ij'  for j != i  (renormalised over others);
  S_cross = mean_i ( max_{j != i} a_ij - mean_{j != i} a_ij ).

It is 0 when N = 2 (one other member: max = mean) and for uniform attention,
and grows as members single out one neighbour. We define it as 0 for N = 1.
Report it as a percentage (100 * S_cross) to compare with the paper.

Everything here is pure JAX and jitted (group size static), for use inside
the sampler: `member_mass_from_qk` recomputes one member's attention rows at
a time from q and k, so no [N*L, N*L] matrix per head is ever stored.
"""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=('group_size',))
def member_mass(probs, group_size):
  """Mass per (query member, key member) from attention probabilities.

  Args:
    probs: [G, H, N*L, N*L] attention probabilities (queries x keys, rows sum
      to 1), members' tokens contiguous (member i = tokens i*L .. i*L+L-1).
    group_size: N (static).

  Returns:
    A: [G, N, N] float32, A[g, i, j] = mean over heads and i's query tokens of
    the mass on j's keys; rows sum to 1.
  """
  g, h, tq, tk = probs.shape
  if tq != tk or tq % group_size:
    raise ValueError(f'Expected probabilities [G, H, N*L, N*L] with N={group_size}; got {probs.shape}.')
  length = tq // group_size
  per_key_member = probs.astype(jnp.float32).reshape(g, h, tq, group_size, length).sum(-1)  # [G, H, N*L, N]
  per_key_member = per_key_member.reshape(g, h, group_size, length, group_size)  # [G, H, N, L, N]
  return per_key_member.mean(axis=(1, 3))  # [G, N, N]


@functools.partial(jax.jit, static_argnames=('group_size',))
def member_mass_from_qk(q, k, group_size, scale=None):
  """`member_mass` of softmax(q k^T * scale), one query member at a time.

  Args:
    q, k: [G, N*L, H, D] queries and keys of one attention layer for G groups
      (the layout `jax.nn.dot_product_attention` takes after `to_groups`).
    group_size: N (static).
    scale: logit scale; default 1/sqrt(D), as jax.nn.dot_product_attention.

  Returns:
    [G, N, N] float32, as `member_mass`. Peak extra memory: one member's
    logits, [G, H, L, N*L] floats, via lax.map over members.
  """
  g, t, h, d = q.shape
  if k.shape != q.shape or t % group_size:
    raise ValueError(f'Expected q, k [G, N*L, H, D] with N={group_size}; got {q.shape}, {k.shape}.')
  length = t // group_size
  scale = d ** -0.5 if scale is None else scale
  keys = k.astype(jnp.float32)
  queries = q.reshape(g, group_size, length, h, d).swapaxes(0, 1)  # [N, G, L, H, D]

  def one_member(q_i):  # [G, L, H, D] -> [G, N]
    logits = jnp.einsum('glhd,gthd->ghlt', q_i.astype(jnp.float32), keys) * scale  # [G, H, L, N*L]
    probs = jax.nn.softmax(logits, axis=-1)
    mass = probs.reshape(g, h, length, group_size, length).sum(-1)  # [G, H, L, N]
    return mass.mean(axis=(1, 2))  # [G, N]

  return jax.lax.map(one_member, queries).swapaxes(0, 1)  # [G, N, N]


@jax.jit
def member_shares(mass):
  """a_ij: member i's mass on member j != i renormalised over j != i.

  Args:
    mass: [..., N, N] member masses (N >= 2; the diagonal is ignored).

  Returns:
    [..., N, N] float32, rows sum to 1 over j != i, diagonal 0; a member
    that puts no mass on others gets the uniform 1 / (N - 1).
  """
  n = mass.shape[-1]
  mass = mass.astype(jnp.float32)
  others = ~jnp.eye(n, dtype=bool)  # [N, N]
  off = jnp.where(others, mass, 0.0)
  total = off.sum(-1, keepdims=True)  # [..., N, 1]
  share = jnp.where(total > 0, off / jnp.where(total > 0, total, 1.0), 1.0 / (n - 1))
  return jnp.where(others, share, 0.0)


@jax.jit
def s_cross_from_mass(mass):
  """S_cross from member masses.

  Args:
    mass: [..., N, N], mass[..., i, j] from member i's queries to j's keys
      (the diagonal is ignored).

  Returns:
    [...] float32 S_cross per group; 0 when N < 3 or when attention to the
    other members is uniform (also when a member puts no mass on others).
  """
  n = mass.shape[-1]
  if n < 2:
    return jnp.zeros(mass.shape[:-2], jnp.float32)
  others = ~jnp.eye(n, dtype=bool)  # [N, N]
  share = member_shares(mass)  # a_ij
  focus = jnp.max(jnp.where(others, share, -jnp.inf), axis=-1) - share.sum(-1) / (n - 1)  # [..., N]
  return focus.mean(-1)


@functools.partial(jax.jit, static_argnames=('group_size',))
def s_cross(probs, group_size):
  """S_cross per group [G] of one layer's probabilities [G, H, N*L, N*L]."""
  return s_cross_from_mass(member_mass(probs, group_size))


@functools.partial(jax.jit, static_argnames=('group_size',))
def s_cross_from_qk(q, k, group_size, scale=None):
  """S_cross per group [G] of one layer from q, k [G, N*L, H, D]."""
  return s_cross_from_mass(member_mass_from_qk(q, k, group_size, scale))


@functools.partial(jax.jit, static_argnames=('average',))
def aggregate_s_cross(masses, average='mass'):
  """S_cross over several layers and/or sampling stages.

  Args:
    masses: [S, ..., N, N] member masses stacked over layers/stages (S).
    average: 'mass' (default, METHOD.md: average A_ij over layers/stages,
      then renormalise and score) or 'score' (score each entry, then mean).

  Returns:
    [...] S_cross per group.
  """
  if average == 'mass':
    return s_cross_from_mass(jnp.mean(masses, axis=0))
  if average == 'score':
    return jnp.mean(s_cross_from_mass(masses), axis=0)
  raise ValueError(f"Unknown average={average!r}; choose 'mass' or 'score'.")
