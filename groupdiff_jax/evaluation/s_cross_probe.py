"""S_cross of a DiT forward pass, per layer, without touching the model code.

The model (models/dit.py) returns no attention maps. This probe runs one
forward pass under `flax.linen.intercept_methods`: it records, for every
`GroupAttention` call, the group size the block used and the output of its
`qkv` Dense ([B, L, 3C], laid out like GroupAttention reads it: q, k, v then
heads), and feeds q, k of the blocks that attended over the group to
`s_cross.member_mass_from_qk` (no [N*L, N*L] matrix is stored).

Definition and caveats: evaluation/s_cross.py (our reading of the paper; the
official code does not compute S_cross). Blocks that attended per image
(group attention switched off for them, or the whole pass) have no
cross-member mass and are left out: the result lists the layers it covers.

During sampling, call `member_masses` on the model input of the branch to
measure (e.g. the unconditional group branch of GroupDiff-l) at the stages of
interest, stack the results to [stages, layers, G, N, N], and `summarize`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from groupdiff_jax.evaluation import s_cross
from groupdiff_jax.models import group_attention


@functools.partial(jax.jit, static_argnames=('model', 'group_size', 'group_attention_on'))
def member_masses(model, params, x, t, y, sample_ids=None, *, group_size, group_attention_on=True):
  """Member masses of every block that attended over the group in one forward pass.

  Args:
    model: a `dit.DiT` (static).
    params: its params.
    x, t, y, sample_ids: the model inputs ([G*N, H, W, C], [G*N], [G*N], [G*N]).
    group_size: N (static).
    group_attention_on: the model's `group_attention` switch (static).

  Returns:
    (layers, mass): layers int32 [S], the indices of the blocks covered;
    mass float32 [S, G, N, N], mass[s, g, i, j] = attention mass of member i's
    queries on member j's keys in block layers[s] (mean over heads and i's
    query tokens; rows sum to 1). S is 0 when no block attended over a group.
  """
  records = []  # (layer, qkv [B, L, 3C], num_heads) of the blocks that attended over the group
  active = []  # (layer, group size) of the GroupAttention call in progress
  count = [0]  # GroupAttention calls so far = the layer index of the next one

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, group_attention.GroupAttention) and context.method_name == '__call__':
      active.append((count[0], args[1] if len(args) > 1 else kwargs['group_size']))
      count[0] += 1
      try:
        return next_fun(*args, **kwargs)
      finally:
        active.pop()
    out = next_fun(*args, **kwargs)
    if active and context.method_name == '__call__' and isinstance(module, nn.Dense) and module.name == 'qkv':
      layer, block_group_size = active[-1]
      if block_group_size == group_size > 1:
        records.append((layer, out, module.parent.num_heads))
    return out

  with nn.intercept_methods(interceptor):
    model.apply({'params': params}, x, t, y, sample_ids, group_size=group_size, group_attention=group_attention_on)

  masses = []
  for _, qkv, heads in records:
    batch, length, _ = qkv.shape
    qkv = qkv.reshape(batch, length, 3, heads, -1)  # as GroupAttention: [B, L, 3, H, D]
    q = group_attention.to_groups(qkv[:, :, 0], group_size)  # [G, N*L, H, D]
    k = group_attention.to_groups(qkv[:, :, 1], group_size)
    masses.append(s_cross.member_mass_from_qk(q, k, group_size))  # [G, N, N]
  groups = x.shape[0] // group_size
  layers = jnp.asarray([layer for layer, _, _ in records], jnp.int32)
  mass = jnp.stack(masses) if masses else jnp.zeros((0, groups, group_size, group_size), jnp.float32)
  return layers, mass


def summarize(mass):
  """S_cross from masses stacked over sampling stages and layers.

  Args:
    mass: [stages, layers, G, N, N] from `member_masses` at several stages
      (a single pass: add a leading axis of 1).

  Returns:
    dict of float32 arrays: 'per_layer' [layers] and 'per_stage' [stages]
    (masses averaged over the other axis and the groups' scores averaged),
    'per_stage_layer' [stages, layers], and 'mean' (masses averaged over
    stages and layers, then scored; METHOD.md section 4), all mean over groups.
  """
  score = s_cross.s_cross_from_mass  # [..., N, N] -> [...]
  return {
      'per_stage_layer': score(mass).mean(-1),
      'per_layer': score(mass.mean(0)).mean(-1),
      'per_stage': score(mass.mean(1)).mean(-1),
      'mean': score(mass.mean((0, 1))).mean(-1),
  }
