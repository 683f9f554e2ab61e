"""TrainState, the optimizer and the pure, jitted group training step."""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from groupdiff_jax import sharding, transport
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


def decay_mask(params):
  """True for weight matrices (Dense/Conv kernels): the only decayed leaves.

  Biases, embedding tables (label, sample) and norms are not decayed, as in
  the official GroupDiff optimizer.
  """
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({path: path[-1] == 'kernel' for path in flat})


def make_optimizer(optim):
  """AdamW with global-norm clipping from the config's `optim` section.

  Official GroupDiff: lr 1e-4 constant, betas (0.9, 0.95), weight decay 0.01
  on weight matrices, clipping at 3.0. Plain DiT/SiT: betas (0.9, 0.999), no
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


def ema_update(ema_params, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def _sub_batch_loss(params, apply_fn, sub, images, labels, rng, train_config, max_group_size, null_class):
  """Per-image SiT losses [num_images] of one sub-batch."""
  time_rng, noise_rng, id_rng, drop_rng = jax.random.split(rng, 4)
  if not sub.conditional:
    labels = jnp.full_like(labels, null_class)
  elif train_config.label_dropout > 0 and train_config.group_ratio == 0:
    # Plain DiT/SiT CFG dropout. With group steps, the unconditional groups
    # are the dropout and conditional images keep their labels (official).
    drop = jax.random.bernoulli(drop_rng, train_config.label_dropout, labels.shape)
    labels = jnp.where(drop, null_class, labels)
  t = transport.sample_group_times(time_rng, sub.num_groups, sub.group_size, train_config.timestep_jitter)
  noise = jax.random.normal(noise_rng, images.shape, images.dtype)
  ids = None
  if max_group_size > 0:
    ids = draw_sample_ids(id_rng, sub.num_groups, sub.group_size, max_group_size, train_config.fixed_sample_ids)

  def model_fn(x_t, t):
    return apply_fn({'params': params}, x_t, t, labels, ids, group_size=sub.group_size)

  return transport.training_loss(model_fn, images, noise, t)


def train_step(state, batch, kind, train_config, optim_config, max_group_size, null_class):
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

  Returns:
    (new state, metrics dict of scalars).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    losses = [
        _sub_batch_loss(params, state.apply_fn, sub, part['images'], part['labels'], jax.random.fold_in(rng, i),
                        train_config, max_group_size, null_class)
        for i, (sub, part) in enumerate(zip(kind, batch))
    ]
    return jnp.mean(jnp.concatenate(losses))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_update(state.ema_params, params, optim_config.ema_decay))
  return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}


def make_jitted_train_step(config, mesh, state_sharding):
  """jax.jit of train_step over `mesh`: state as given, batch split by group.

  The train state is donated. Each step kind compiles once.
  """
  step = functools.partial(train_step, train_config=config.train, optim_config=config.optim,
                           max_group_size=config.model.max_group_size, null_class=config.model.num_classes)
  batch_sharding = sharding.batch_sharding(mesh)
  jitted = {}

  def run(state, batch, kind):
    if kind not in jitted:
      sharding.check_groups_fit_mesh(kind, mesh)
      jitted[kind] = jax.jit(functools.partial(step, kind=kind), donate_argnums=0,
                             in_shardings=(state_sharding, batch_sharding),
                             out_shardings=(state_sharding, sharding.replicated(mesh)))
    return jitted[kind](state, batch)

  return run
