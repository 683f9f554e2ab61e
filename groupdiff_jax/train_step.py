"""TrainState, the optimizer and the pure, jitted group training step."""

import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from groupdiff_jax import errors, sharding, transport
from groupdiff_jax.models import group_attention, official_names
from groupdiff_jax.models.embeddings import draw_sample_ids


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes, plus the fixed base PRNG key.

  The key of step s is fold_in(rng, s): no key is carried from step to step,
  so a resumed run draws exactly the randomness an uninterrupted one would.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def decay_name(path):
  """The name the official weight-decay rule reads for our param path.

  The official PyTorch name (models/official_names.py) for the DiT/SiT
  leaves; any other leaf (a model outside the converter's table) is judged
  by its own path joined with '.'.
  """
  try:
    return official_names.official_key(path)
  except KeyError:
    return '.'.join(path)


def decay_mask(params):
  """True for the leaves the official AdamW decays.

  Official rule (utils/builders.py, create_optimizer_and_scaler): no decay
  for tensors of fewer than 2 dims or whose PyTorch name contains ln, bias,
  embedding, norm, gamma, embed, token or diffloss. For DiT/SiT this decays
  the kernels of attn.qkv, attn.proj, mlp.fc1/fc2, adaLN_modulation.1 (every
  block and the final layer) and final_layer.linear, and spares the patch
  embedder (x_embedder), the timestep MLP (t_embedder), the label and sample
  tables and every bias.
  """
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {path: official_names.officially_decayed(decay_name(path), leaf.ndim) for path, leaf in flat.items()})


def make_optimizer(optim):
  """AdamW with global-norm clipping from the config's `optim` section.

  Official GroupDiff: lr 1e-4 constant, betas (0.9, 0.95), weight decay 0.01
  on the leaves of decay_mask, clipping at 3.0. Plain DiT/SiT: betas (0.9, 0.999), no
  clipping (grad_clip 0), no weight decay.
  """
  steps = []
  if optim.grad_clip > 0:
    steps.append(optax.clip_by_global_norm(optim.grad_clip))
  steps.append(optax.adamw(optim.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*steps)


def init_params(model, rng, input_size, in_channels):
  """Model parameters from a tiny example batch."""
  x = jnp.zeros((1, input_size, input_size, in_channels), jnp.float32)
  ids = jnp.zeros((1,), jnp.int32)
  return model.init(rng, x, jnp.zeros((1,)), ids, ids)['params']


def create_train_state(model, config, rng):
  """Fresh TrainState: params, EMA copy, optimizer state, base key."""
  init_rng, step_rng = jax.random.split(rng)
  params = init_params(model, init_rng, config.model.input_size, config.model.in_channels)
  tx = make_optimizer(config.optim)
  # The EMA starts as a copy (own buffers: the state is donated to the step).
  ema_params = jax.tree.map(jnp.copy, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params, opt_state=tx.init(params),
                    rng=step_rng, apply_fn=model.apply, tx=tx)


def create_sharded_train_state(model, config, mesh, rng):
  """Shape-first initialisation: the state is created already sharded.

  `jax.eval_shape` gives the state's shapes without computing it, the rules
  in sharding.py turn them into shardings, and `jax.jit(..., out_shardings=)`
  creates every leaf directly on its devices, so a full unsharded copy of
  the parameters never exists on one device.

  Returns:
    (state, state_shardings): the TrainState and a matching tree of
    NamedShardings (the jitted step's in/out shardings).
  """
  create = functools.partial(create_train_state, model, config)
  abstract = jax.eval_shape(create, rng)
  shardings = sharding.state_shardings_from_config(abstract, mesh, config.mesh)
  state = jax.jit(create, out_shardings=shardings)(rng)
  return state, shardings


def ema_update(ema_params, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


OBJECTIVES = ('sit', 'dit')


def _dit_losses(model_fn, images, time_rng, noise_rng, sub, timestep_jitter):
  """Per-image DiT hybrid losses (mse + vb) [num_images] of one sub-batch.

  Integer timesteps with the official intra-group variance
  (int(timestep_jitter * 1000) steps around a base step per group), DDPM
  with 1000 linear-beta steps; the model sees the integer timestep and must
  output [B, H, W, 2C] (learned sigma).
  """
  from groupdiff_jax import diffusion as gd  # kept local: this block is the DiT objective only
  schedule = gd.create_schedule('')
  t = gd.sample_group_timesteps(time_rng, sub.num_groups, sub.group_size, schedule.num_timesteps, timestep_jitter)
  noise = jax.random.normal(noise_rng, images.shape, jnp.float32)

  def checked_model_fn(x_t, t_model):
    out = model_fn(x_t, t_model)
    if out.shape[-1] != 2 * images.shape[-1]:
      raise errors.ConfigError(f'model.objective=dit needs model.learn_sigma=True (a {2 * images.shape[-1]}-channel '
                               f'output of eps and variance values); the model outputs {out.shape[-1]} channels. '
                               'Pass --config.model.learn_sigma=True.')
    return out

  return gd.training_losses(checked_model_fn, images, t, noise, schedule)


def _sub_batch_loss(params, apply_fn, sub, images, labels, rng, train_config, max_group_size, null_class,
                    model_config):
  """Per-image losses [num_images] of one sub-batch.

  model_config: the config's `model` section. Its `objective` picks the
  loss: 'sit' (transport.py: the model's `path`, `prediction`,
  `loss_weight`; linear velocity MSE at uniform t by default.py) or 'dit'
  (DDPM hybrid loss at integer t, _dit_losses). The
  step takes the plain mean over images either way, as the official code.
  """
  objective = model_config.objective
  if objective not in OBJECTIVES:
    raise errors.ConfigError(f'Unknown model.objective={objective!r}; use one of {OBJECTIVES}.')
  time_rng, noise_rng, id_rng, drop_rng = jax.random.split(rng, 4)
  if not sub.conditional:
    labels = jnp.full_like(labels, null_class)
  elif train_config.label_dropout > 0 and train_config.group_ratio == 0:
    # Plain DiT/SiT CFG dropout. With group steps, the unconditional groups
    # are the dropout and conditional images keep their labels (official).
    drop = jax.random.bernoulli(drop_rng, train_config.label_dropout, labels.shape)
    labels = jnp.where(drop, null_class, labels)
  ids = None
  if max_group_size > 0:
    ids = draw_sample_ids(id_rng, sub.num_groups, sub.group_size, max_group_size, train_config.fixed_sample_ids)

  def model_fn(x_t, t):
    return apply_fn({'params': params}, x_t, t, labels, ids, group_size=sub.group_size)

  if objective == 'dit':
    return _dit_losses(model_fn, images, time_rng, noise_rng, sub, train_config.timestep_jitter)
  t = transport.sample_group_times(time_rng, sub.num_groups, sub.group_size, train_config.timestep_jitter)
  noise = jax.random.normal(noise_rng, images.shape, images.dtype)
  return transport.training_loss(model_fn, images, noise, t, transport.transport_from_config(model_config))


def step_loss(losses):
  """The step's loss from the per-image losses of its sub-batches: their plain mean.

  Every image weighs 1/B (B the step's images), as in the official step,
  which averages over the GPUs the per-GPU mean losses of batches of equal
  size: a mixed step of singles and groups is weighted like the official
  step that holds the same images (tests/test_step_composition.py checks it
  against a NumPy reading of the official averaging).
  """
  return jnp.mean(jnp.concatenate(losses))


def all_finite(tree):
  """Scalar bool: every floating-point leaf of `tree` finite.

  One reduction per leaf (`isfinite(x).all()`), which XLA fuses into the
  fusion that produces the leaf (the AdamW/EMA update), so it reads no
  memory a second time.
  """
  checks = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.stack(checks).all() if checks else jnp.bool_(True)


class UpdateLayout(NamedTuple):
  """How a sharded update (mesh.shard_update, ZeRO-2) lays the parameters out in a step.

  The state holds the float32 parameters split like the EMA and optimizer
  state (sharding.py: over fsdp, data and group); each device updates its
  slice. `compute`: the parameters' shardings as the model reads them (over
  fsdp only), to which they are all-gathered once per step, in `dtype`.
  """
  compute: Any
  dtype: Any


def gather_for_compute(params, layout):
  """The parameters as the model reads them: the update slices all-gathered once (in layout.dtype), back in
  their own dtype; the backward is the identity (float32 cotangents, reduced into each device's slice by the
  caller's constraint).

  Gathering in the compute dtype is exact for models/dit.py: every parameter
  enters through a flax layer (Dense, Conv, Embed) built with that dtype,
  which casts it before use (tests/test_train_step.py checks the outputs and
  gradients are bit-identical), so the model reads the same values (XLA
  folds the cast back to float32 and the layer's cast to the compute dtype
  into nothing). The identity backward keeps the sum of a parameter's
  cotangents over its uses (one per sub-batch of a mixed step) in float32,
  as without the gather.
  """

  def one(param, compute_sharding):
    @jax.custom_vjp
    def gather(p):
      # The barrier pins the cast before the gather: XLA's GPU compiler otherwise moved it after, gathering
      # float32 (h100:8, SiT-XL/2 depth 2: 210 vs 107 MB of all-gathers; on v5p both gathered bf16, and the
      # barrier lowered libtpu's bytes accessed by 0.8%).
      low = jax.lax.optimization_barrier(p.astype(layout.dtype))
      return jax.lax.with_sharding_constraint(low, compute_sharding).astype(p.dtype)

    gather.defvjp(lambda p: (gather(p), None), lambda _, cotangent: (cotangent,))
    return gather(param)

  return jax.tree.map(one, params, layout.compute)


def step_loss_fn(state, batch, kind, train_config, max_group_size, null_class, model_config=None, layout=None):
  """params -> the step's loss (train_step's arguments); with `layout` the model reads the parameters
  gathered by gather_for_compute."""
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    if layout is not None:
      params = gather_for_compute(params, layout)
    losses = [
        _sub_batch_loss(params, state.apply_fn, sub, part['images'], part['labels'], jax.random.fold_in(rng, i),
                        train_config, max_group_size, null_class, model_config)
        for i, (sub, part) in enumerate(zip(kind, batch))
    ]
    return step_loss(losses)

  return loss_fn


def loss_and_grads(state, batch, kind, train_config, max_group_size, null_class, model_config=None,
                   grad_sharding=None, layout=None):
  """(loss, gradients) of one step (train_step's arguments); the gradients constrained to `grad_sharding`
  (the parameters' layout in the state: with a sharded update XLA reduce-scatters them into each device's
  slice)."""
  loss_fn = step_loss_fn(state, batch, kind, train_config, max_group_size, null_class, model_config, layout)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  if grad_sharding is not None:
    grads = jax.lax.with_sharding_constraint(grads, grad_sharding)
  return loss, grads


def train_step(state, batch, kind, train_config, optim_config, max_group_size, null_class, model_config,
               check_update=True, grad_sharding=None, layout=None):
  """One optimizer step on a batch of one kind.

  Args:
    state: TrainState.
    batch: tuple, one dict per SubBatch of `kind`, each with 'images'
      [num_images, H, W, C] (members of a group contiguous) and 'labels'
      [num_images] int32.
    kind: tuple of step_plan.SubBatch (static).
    train_config, optim_config: the config's `train` and `optim` sections.
    max_group_size: the model's sample-table size (0: no sample embedding).
    null_class: the label of the unconditional class.
    model_config: the config's `model` section (objective, transport).
    check_update: also skip the step when the new params, optimizer state
      or EMA would hold a non-finite value: True checks the updates (see the
      comment below), 'state' every new leaf, False neither (benchmarks
      compare them).
    grad_sharding: None, or shardings (the parameters' tree) the gradients
      are constrained to: the parameters' own, so that with a sharded update
      (sharding.py, ZeRO-2) XLA reduce-scatters them instead of all-reducing.
    layout: None, or the UpdateLayout of a sharded update: the state's
      parameters are each device's slices, gathered for the model once.

  Returns:
    (new state, metrics dict of scalars: loss, grad_norm, and nonfinite,
    1 when the step was skipped because the loss, gradients or the updated
    state were not finite).
  """
  loss, grads = loss_and_grads(state, batch, kind, train_config, max_group_size, null_class, model_config,
                               grad_sharding, layout)
  # With a sharded update every leaf below is this device's slice: the global norm (clipping, metrics) is a
  # sum of the slices' squares, one scalar all-reduce.
  grad_norm = optax.tree.norm(grads)
  old = (state.params, state.opt_state, state.ema_params)

  def update(parts):
    """((new params, optimizer state, EMA), the AdamW updates) from the current ones."""
    params, opt_state, ema_params = parts
    updates, opt_state = state.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state, ema_update(ema_params, params, optim_config.ema_decay)), updates

  # Non-finite guard: a step whose loss or gradient norm is NaN/inf, or whose
  # new params, optimizer state or EMA would hold a NaN/inf, keeps params,
  # optimizer state and EMA as they were; the step count still advances (the
  # next step draws the next batch and key) and the step is counted in
  # `nonfinite` (train.py stops after too many in a row).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # The update check reads the AdamW updates: with a finite loss, gradients
  # (their norm bounds every g**2) and previous state (restore checks it, and
  # each step keeps it so), finite updates give finite new mu, nu, params and
  # EMA (barring an overflow of a sum of finite floats); NaN in mu or nu, or
  # in a decayed weight, makes the updates NaN. 'state' checks every new leaf
  # instead (measured slower: docs/benchmarks.md).
  if check_update == 'state' or group_attention.target_platform() != 'cpu':
    new, updates = update(old)
    if check_update:
      finite = finite & all_finite(new if check_update == 'state' else updates)
    params, opt_state, ema_params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  else:
    if check_update:  # the updates reduced to one flag here; the update itself is computed again in the branch
      finite = finite & all_finite(update(old)[1])
    # On CPU a branch rather than a select per leaf: XLA CPU then updates the state in place, one pass over
    # each leaf, where `where(finite, new, old)` kept the old and new leaves and took 1.7x the CPU time
    # (docs/benchmarks.md); the values are the same.
    params, opt_state, ema_params = jax.lax.cond(finite, lambda parts: update(parts)[0], lambda parts: parts, old)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
  return new_state, {'loss': loss, 'grad_norm': grad_norm, 'nonfinite': 1 - finite.astype(jnp.int32)}


def update_layout(config, state_sharding):
  """The UpdateLayout of a sharded update (mesh.shard_update with a TrainState of shardings), else None."""
  mesh_config = config.mesh
  if not isinstance(state_sharding, TrainState) or mesh_config is None or not mesh_config.shard_update:
    return None
  return UpdateLayout(compute=jax.tree.map(sharding.compute_sharding, state_sharding.params),
                      dtype=jnp.dtype(config.model.dtype))


def make_jitted_train_step(config, mesh, state_sharding):
  """jax.jit of train_step over `mesh`: state as given, batch split by group.

  The train state is donated. Each step kind compiles once. Steps run under
  `sharding.use_mesh(mesh)`, so that kernels XLA cannot partition (Pallas
  splash attention) are mapped over the batch axes per device, and groups
  split over the mesh's group axis attend across it (group_attention.py).
  The gradients take the parameters' layout in the state; with
  mesh.shard_update that is each device's slice (reduce-scattered, ZeRO-2)
  and the model reads the parameters gathered in the compute dtype
  (update_layout).
  """
  mesh_config = config.mesh
  step = functools.partial(train_step, train_config=config.train, optim_config=config.optim,
                           max_group_size=config.model.max_group_size, null_class=config.model.num_classes,
                           model_config=config.model,
                           # one sharding for the whole state (a pytree prefix) is the gradients' too
                           grad_sharding=getattr(state_sharding, 'params', state_sharding),
                           layout=update_layout(config, state_sharding))
  batch_sharding = sharding.batch_sharding(mesh)
  jitted = {}

  def jitted_for(kind):
    if kind not in jitted:
      sharding.check_groups_fit_mesh(kind, mesh)
      jitted[kind] = jax.jit(functools.partial(step, kind=kind), donate_argnums=0,
                             in_shardings=(state_sharding, batch_sharding),
                             out_shardings=(state_sharding, sharding.replicated(mesh)))
    return jitted[kind]

  def run(state, batch, kind):
    with sharding.use_mesh(mesh, mesh_config):
      return jitted_for(kind)(state, batch)

  def lower(state, batch, kind):
    """The same program lowered (AOT, e.g. for abstract TPU devices: compile_job.py); inputs may be abstract."""
    with sharding.use_mesh(mesh, mesh_config):
      return jitted_for(kind).lower(state, batch)

  run.lower = lower
  return run
