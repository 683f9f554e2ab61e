"""S_cross, the cross-sample attention score (docs/method.md, S_cross, our reading): one measurement, two callers.

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

The measurement (`member_masses`): one forward pass of the model with its
`intermediates` collection mutable; every GroupAttention that attends over a
group sows its q and k ([B, L, H, D], models/group_attention.py), and
`member_mass_from_qk` turns them into masses one member at a time (no
[N*L, N*L] matrix per head is stored). Blocks that attended per image
(group attention off for them, or for the whole pass) sow nothing and are
left out: the result lists the layers it covers.

Its two callers:
  * on the sampler's own trajectory (`make_trajectory_sampler`: the SiT ODE
    sampler one step per call; before every step that runs the
    unconditional branch grouped, that branch's own x_t, t, null labels and
    sample ids go through `member_masses`; experiments/table1.py);
  * on re-noised samples (`renoised_masses`: final samples noised back to
    each stage of `sample.s_cross_stages` by the forward process, one pass of
    the grouped branch per stage; the sample job with `sample.s_cross=True`).
Both summarise with `report`, one schema: S_cross values in percent (keys
`*_percent`), masses as fractions (`self_mass_fraction*`). Whether group
attention is on at a point of the trajectory is samplers.group_attention_on,
the function the samplers themselves use.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax import diffusion as gd
from groupdiff_jax import errors, samplers
from groupdiff_jax import transport as transport_lib
from groupdiff_jax.models import group_attention
from groupdiff_jax.models.embeddings import draw_sample_ids

SHARE_HISTOGRAM_BINS = 20  # equal bins of a_ij over [0, 1]
QK_NAME = 'group_qk'  # what GroupAttention sows into 'intermediates' when it attends over a group


# --- The score of member masses ------------------------------------------------------
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

# --- The measurement ----------------------------------------------------------------
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
  _, state = model.apply({'params': params}, x, t, y, sample_ids, group_size=group_size,
                         group_attention=group_attention_on, mutable=['intermediates'])
  sown = state.get('intermediates', {})
  layers, masses = [], []
  for layer in range(model.depth):  # the blocks are `blocks_<layer>` (models/dit.py), attention `attn`
    qk = sown.get(f'blocks_{layer}', {}).get('attn', {}).get(QK_NAME)
    if qk is None:
      continue
    q, k = (group_attention.to_groups(a, group_size) for a in qk[0])  # [G, N*L, H, D]
    layers.append(layer)
    masses.append(member_mass_from_qk(q, k, group_size))  # [G, N, N]
  groups = x.shape[0] // group_size
  mass = jnp.stack(masses) if masses else jnp.zeros((0, groups, group_size, group_size), jnp.float32)
  return jnp.asarray(layers, jnp.int32), mass


def group_attention_at(stage, group_stage_fraction):
  """Whether the sampler uses group attention at `stage` (fraction of the trajectory done from the noise end:
  noise level 1 - stage, samplers.group_attention_on)."""
  return bool(samplers.group_attention_on(1.0 - stage, group_stage_fraction))


# --- Caller 1: the sampler's own trajectory ------------------------------------------
def make_trajectory_sampler(model, model_config, sample_config):
  """sample(params, noise [B,H,W,C], labels [B], key, probe_images) -> (x1, probe record).

  The record: {'steps_t': [K] step times, 'probed': [K] bool (the step ran
  the unconditional branch with group attention), 'layers': block indices
  covered (None when nothing was probed), 'masses': float32
  [K_probed, layers, G, N, N] member masses of the first `probe_images`
  images (whole groups of N = sample.uncond_group_size)}. probe_images 0
  probes nothing. Step k uses key fold_in(key, k).
  """
  s = sample_config
  if model_config.objective != 'sit':
    raise errors.ConfigError(f"The trajectory probe runs the SiT ODE sampler; model.objective="
                             f"{model_config.objective!r} (use renoised_masses for DiT).")
  if s.sampler not in samplers.ODE_SAMPLERS:
    raise errors.ConfigError(f'The trajectory probe integrates a fixed-step ODE; sample.sampler={s.sampler!r} is '
                             f'not one of {samplers.ODE_SAMPLERS}.')
  guidance = samplers.guidance_from_config(s)
  transport = transport_lib.transport_from_config(model_config)
  t_start, t_end = transport_lib.time_interval(transport, sampling=True)
  group_size, null_class = s.uncond_group_size, model_config.num_classes
  dt = (t_end - t_start) / s.num_steps

  @jax.jit
  def step(params, x, labels, key, t):  # t traced: one compile for every step
    velocity = samplers.make_velocity_fn(model.apply, params, labels, guidance, transport=transport,
                                         null_class=null_class, max_group_size=model_config.max_group_size,
                                         data_channels=model_config.in_channels)
    noise_level = 1.0 - t  # as make_prediction_fn
    grouped = (samplers.guidance_applies(noise_level, guidance) & samplers.group_attention_on(
        noise_level, guidance.group_stage_fraction) & (guidance.cfg_scale != 1.0) & (group_size > 1))
    # integrate_ode's single step evaluates the velocity with key fold_in(key, 0).
    return samplers.integrate_ode(velocity, x, key, 1, s.sampler, t, t + dt), grouped

  @functools.partial(jax.jit, static_argnames=('num_images',))
  def probe(params, x, key, t, num_images):
    _, uncond_rng = samplers.branch_rngs(jax.random.fold_in(key, 0))  # the key integrate_ode gave the velocity
    ids = samplers.branch_sample_ids(uncond_rng, num_images, group_size, model_config.max_group_size,
                                     guidance.fixed_sample_ids)
    ids = None if ids is None else ids[:x.shape[0]]
    return member_masses(model, params, x, jnp.full((x.shape[0],), t), jnp.full(
        (x.shape[0],), null_class), ids, group_size=group_size)

  def sample(params, noise, labels, key, probe_images=0):
    probe_images = probe_images // group_size * group_size if group_size > 1 else 0
    x, times, probed, masses, layers = noise, [], [], [], None
    for k in range(s.num_steps):
      t = jnp.float32(t_start + k * dt)
      step_key = jax.random.fold_in(key, k)
      x_next, grouped = step(params, x, labels, step_key, t)
      grouped = bool(grouped) and probe_images > 0
      if grouped:
        layers, mass = probe(params, x[:probe_images], step_key, t, x.shape[0])
        masses.append(np.asarray(mass))  # [layers, G, N, N]
      times.append(float(t))
      probed.append(grouped)
      x = x_next
    record = {'steps_t': times, 'probed': probed, 'layers': None if layers is None else np.asarray(layers).tolist(),
              'masses': np.stack(masses) if masses else np.zeros((0,), np.float32)}
    return x, record

  return sample


# --- Caller 2: re-noised final samples -----------------------------------------------
def s_cross_branch(sample_config):
  """(name, group size, unconditional) of the branch whose attention over its group is measured.

  The unconditional branch when CFG runs it and it is grouped (GroupDiff-l:
  uncond_group_size 4), else a grouped conditional branch (GroupDiff-f
  without CFG); a clear error when no branch attends over a group.
  """
  s = sample_config
  if s.cfg_scale != 1.0 and s.uncond_group_size > 1:
    return 'unconditional', s.uncond_group_size, True
  if s.cond_group_size > 1:
    return 'conditional', s.cond_group_size, False
  raise errors.ConfigError(f'sample.s_cross=True measures how members attend to each other, but no branch attends '
                           f'over a group here (sample.cond_group_size={s.cond_group_size}, sample.uncond_group_size='
                           f'{s.uncond_group_size}, sample.cfg_scale={s.cfg_scale}): set a group size > 1 for a branch '
                           'that runs (e.g. --config.sample.uncond_group_size=4 with cfg_scale != 1), or drop '
                           'sample.s_cross.')


def noised(x0, stage, rng, model_config):
  """(x_t [B, H, W, C], model time t [B]) of clean x0 [B, H, W, C] at `stage` (0 = noise end, 1 = data).

  SiT: t = t0 + stage * (t1 - t0) on the sampling interval, x_t from the
  model's path; DiT: original timestep k = round((1 - stage) * (T - 1)),
  x_t = q_sample(x0, k).
  """
  noise = jax.random.normal(rng, x0.shape, jnp.float32)
  batch = x0.shape[0]
  if model_config.objective == 'dit':
    t = jnp.full((batch,), round((1.0 - stage) * (gd.NUM_TIMESTEPS - 1)), jnp.int32)
    return gd.q_sample(x0, t, noise, gd.create_schedule('')), t
  transport = transport_lib.transport_from_config(model_config)
  t0, t1 = transport_lib.time_interval(transport, sampling=True)
  t = jnp.full((batch,), t0 + stage * (t1 - t0), jnp.float32)
  return transport_lib.interpolate(x0, noise, t, transport.path)[0], t


def renoised_masses(model, params, x0, labels, rng, sample_config, model_config):
  """Member masses of the measured branch at every stage of sample.s_cross_stages.

  x0: [B, H, W, C] final samples (model space) of whole groups, labels
  int32 [B] their classes (the conditional branch's labels). At each
  stage the groups are noised back to that point of the trajectory
  (`noised`: the forward process from the sample, not the sampler's own
  state) and one forward pass of the branch (its labels, group size and
  fresh sample ids) runs through member_masses. Stages where the
  sampler has group attention off are skipped.

  Returns:
    (layers int32 [L], mass float32 [S_on, L, B/n, n, n]) with n the
    branch's group size and S_on the stages with group attention.
  """
  _, group_size, unconditional = s_cross_branch(sample_config)
  labels = jnp.full((x0.shape[0],), model_config.num_classes, jnp.int32) if unconditional else jnp.asarray(labels)
  layers, masses = None, []
  x0 = jnp.asarray(x0, jnp.float32)
  for index, stage in enumerate(sample_config.s_cross_stages):
    if not group_attention_at(stage, sample_config.group_stage_fraction):
      continue
    noise_rng, id_rng = jax.random.split(jax.random.fold_in(rng, index))
    x_t, t = noised(x0, stage, noise_rng, model_config)
    ids = None
    if model_config.max_group_size > 0:
      ids = draw_sample_ids(id_rng, x0.shape[0] // group_size, group_size, model_config.max_group_size,
                            sample_config.fixed_sample_ids)
    stage_layers, mass = member_masses(model, params, x_t, t, labels, ids, group_size=group_size)
    layers = np.asarray(stage_layers)
    masses.append(np.asarray(mass))
  return layers, np.stack(masses)

# --- One report ---------------------------------------------------------------------------
def stage_of(t, stage_starts):
  """Index of the stage [stage_starts[i], stage_starts[i + 1]) holding time t (SiT: 0 = noise), compared in
  float32 as the sampler's times; a time before the first start belongs to stage 0."""
  t = np.float32(t)
  return max([0] + [i for i, start in enumerate(stage_starts) if np.float32(start) <= t])


def report(masses, layers, stage_index, stages, group_size, **fields):
  """The JSON-ready S_cross summary; S_cross values in percent, masses as fractions.

  Args:
    masses: float32 [K, layers, G, N, N], one entry per probed pass (a
      sampler step, or a re-noised stage).
    layers: the block indices of the layer axis.
    stage_index: [K] the stage of each pass, an index into `stages`.
    stages: stage starts (names '0', '0.5', ...: f'{stage:g}').
    group_size: N.
    **fields: what the caller adds (method, branch, steps ...).

  Keys: num_groups; layers; mean_percent (masses averaged over passes and
  layers, then scored); per_stage_percent {stage: value or None where
  nothing was probed}; per_layer_percent {layer: value};
  per_stage_layer_percent; self_mass_fraction (the mass a member keeps on
  its own tokens, mean over passes, layers, groups and members; 1/N for
  uniform attention over the group's tokens) and its per_layer and per_stage
  values; share_histogram {edges, counts} of every a_ij (j != i);
  uniform_share 1/(N-1).
  """
  masses = np.asarray(masses, np.float32)
  stage_names = [f'{float(stage):g}' for stage in stages]
  out = {**fields, 'group_size': group_size, 'layers': [int(layer) for layer in layers],
         'num_groups': int(masses.shape[2]) if masses.ndim == 5 else 0, 'stages': [float(s) for s in stages],
         'uniform_share': 1.0 / (group_size - 1) if group_size > 1 else None}
  if masses.ndim != 5 or masses.shape[0] == 0 or masses.shape[1] == 0:
    out.update(mean_percent=None, per_stage_percent={name: None for name in stage_names}, per_layer_percent={},
               per_stage_layer_percent={}, self_mass_fraction=None, self_mass_fraction_per_layer={},
               self_mass_fraction_per_stage={name: None for name in stage_names}, share_histogram=None)
    return out
  score = lambda m: 100.0 * float(np.asarray(s_cross_from_mass(jnp.asarray(m))).mean())  # mean over groups
  diagonal = np.diagonal(masses, axis1=-2, axis2=-1)  # [K, layers, G, N]
  layer_names = [str(int(layer)) for layer in layers]
  stage_index = np.asarray(stage_index)
  per_stage, per_stage_layer, self_per_stage = {}, {}, {}
  for i, name in enumerate(stage_names):
    mine = masses[stage_index == i]
    per_stage[name] = score(mine.mean((0, 1))) if len(mine) else None
    per_stage_layer[name] = ({layer: score(mine[:, j].mean(0)) for j, layer in enumerate(layer_names)}
                             if len(mine) else {})
    self_per_stage[name] = float(diagonal[stage_index == i].mean()) if len(mine) else None
  shares = np.asarray(member_shares(jnp.asarray(masses)))  # [K, layers, G, N, N]
  off_diagonal = shares[..., ~np.eye(group_size, dtype=bool)]  # [K, layers, G, N * (N - 1)]
  counts, edges = np.histogram(off_diagonal, bins=SHARE_HISTOGRAM_BINS, range=(0.0, 1.0))
  out.update(
      mean_percent=score(masses.mean((0, 1))), per_stage_percent=per_stage,
      per_layer_percent={layer: score(masses[:, j].mean(0)) for j, layer in enumerate(layer_names)},
      per_stage_layer_percent=per_stage_layer, self_mass_fraction=float(diagonal.mean()),
      self_mass_fraction_per_layer={layer: float(diagonal[:, j].mean()) for j, layer in enumerate(layer_names)},
      self_mass_fraction_per_stage=self_per_stage,
      share_histogram={'edges': edges.tolist(), 'counts': counts.tolist()})
  return out


def trajectory_report(record, stage_starts, group_size):
  """`report` of a `make_trajectory_sampler` record, plus steps_t, probed and per_step_percent [K] (None where
  a step was not probed)."""
  masses = np.asarray(record['masses'], np.float32)  # [K_probed, layers, G, N, N]
  probed_t = [t for t, p in zip(record['steps_t'], record['probed']) if p]
  out = report(masses, record['layers'] or [], [stage_of(t, stage_starts) for t in probed_t], stage_starts,
               group_size, method="the sampler's own x_t, time, null labels and sample ids at every step that runs "
               'the unconditional group branch', steps_t=record['steps_t'], probed=record['probed'])
  per_step, probed_index = [], 0
  for probed in record['probed']:
    per_step.append(100.0 * float(np.asarray(s_cross_from_mass(jnp.asarray(masses[probed_index].mean(0)))).mean())
                    if probed and out['mean_percent'] is not None else None)
    probed_index += int(probed)
  out['per_step_percent'] = per_step
  return out


def renoised_report(layers, mass, sample_config):
  """`report` of `renoised_masses`' (layers, mass [S_on, L, G, n, n]) over sample.s_cross_stages (None at the
  stages where group attention is off), plus branch and stages_with_group_attention."""
  name, group_size, _ = s_cross_branch(sample_config)
  stages = [float(s) for s in sample_config.s_cross_stages]
  on = [i for i, s in enumerate(stages) if group_attention_at(s, sample_config.group_stage_fraction)]
  out = report(mass, layers, on, stages, group_size, branch=name,
               method='final samples of the first groups noised back to each stage by the forward process, one '
               'forward pass of the branch per stage', stages_with_group_attention=[stages[i] for i in on])
  if not len(layers):
    out['note'] = 'no layer attends over a group (model.group_layers)'
  return out
