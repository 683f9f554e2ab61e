"""The jitted group train step, its optimizer and EMA."""

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import digits
from groupdiff_jax import sharding, step_plan
from groupdiff_jax import train_step as ts
from groupdiff_jax.models import dit


def tiny_config(**train):
  config = digits.get_config()
  config.model.depth = 2
  config.model.hidden_size = 32
  config.model.num_heads = 2
  config.model.input_size = 8
  config.model.variant = 'SiT-S/2'
  config.train.batch_size = 16
  config.train.update(train)
  return config


def make_state(config, seed=0):
  """The model and a fresh TrainState, created by one jitted program (eagerly, every initialiser op compiles
  on its own)."""
  model = dit.model_from_config(config.model)
  return model, jax.jit(functools.partial(ts.create_train_state, model, config))(jax.random.PRNGKey(seed))


def fake_batch(kind, seed=0, num_classes=10):
  rng = np.random.default_rng(seed)
  return tuple({'images': rng.standard_normal((s.num_images, 8, 8, 1)).astype(np.float32),
                'labels': rng.integers(0, num_classes, s.num_images).astype(np.int32)} for s in kind)


MIXED = step_plan.step_kinds(16, 4, 0.25, mixed_steps=True)['mixed']  # 12 singles and one group of 4


@pytest.fixture(scope='module')
def mixed_step():
  """(config, state, batch, its plain jitted step's (new state, metrics)): the one plain train step of the module."""
  config = tiny_config(group_ratio=0.25)
  config.model.depth = 1  # what these tests check holds for any depth; one block compiles in half the time
  config.optim.lr = 3e-3
  _, state = make_state(config)
  batch = fake_batch(MIXED)
  step = jax.jit(functools.partial(ts.train_step, kind=MIXED, train_config=config.train, optim_config=config.optim,
                                   max_group_size=4, null_class=10, model_config=config.model))
  return config, state, batch, step(state, batch)


def test_weight_decay_mask_is_the_official_rule_by_name():
  config = tiny_config()
  model = dit.model_from_config(config.model)
  # The mask is a fact about the parameters' names and ranks: their shapes are enough.
  shapes = jax.eval_shape(lambda key: ts.init_params(model, key, 8, 1), jax.random.PRNGKey(0))
  mask = ts.decay_mask(shapes)
  flat = dict(jax.tree_util.tree_flatten_with_path(mask)[0])
  paths = {'/'.join(k.key for k in path): v for path, v in flat.items()}
  # Official utils/builders.py: decay only tensors of >= 2 dims whose PyTorch name holds none of ln, bias,
  # embedding, norm, gamma, embed, token, diffloss. Written out for this 2-block model:
  decayed = {f'blocks_{i}/{m}/kernel' for i in range(2) for m in ('attn/qkv', 'attn/proj', 'mlp/fc1', 'mlp/fc2',
                                                                  'adaLN_modulation_1')}
  decayed |= {'final_layer/linear/kernel', 'final_layer/adaLN_modulation_1/kernel'}
  assert {p for p, v in paths.items() if v} == decayed
  assert not paths['x_embedder/proj/kernel'] and not paths['t_embedder/mlp_0/kernel']  # 'embed' in their names
  assert ts.decay_name(('blocks_1', 'mlp', 'fc2', 'kernel')) == 'blocks.1.mlp.fc2.weight'
  assert ts.decay_name(('head', 'kernel')) == 'head.kernel'  # outside the table: judged by its own path
  # The optimizer really leaves non-decayed leaves alone under zero gradients: one leaf of each kind, at the
  # model's paths (the optimizer's mask is computed from the paths of the tree it updates).
  kept = [('y_embedder', 'embedding_table', 'embedding'), ('blocks_0', 'attn', 'qkv', 'bias'),
          ('blocks_0', 'attn', 'qkv', 'kernel')]
  flat_shapes = flax.traverse_util.flatten_dict(shapes)
  params = flax.traverse_util.unflatten_dict({k: jnp.ones(flat_shapes[k].shape) for k in kept})
  tx = ts.make_optimizer(ml_collections.ConfigDict(dict(lr=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.5,
                                                        grad_clip=3.0)))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert float(new['y_embedder']['embedding_table']['embedding'][0, 0]) == 1.0
  assert float(new['blocks_0']['attn']['qkv']['bias'][0]) == 1.0
  np.testing.assert_allclose(float(new['blocks_0']['attn']['qkv']['kernel'][0, 0]), 1.0 - 0.1 * 0.5, rtol=1e-6)


def test_gradient_clipping_at_global_norm():
  optim = ml_collections.ConfigDict(dict(lr=1.0, b1=0.0, b2=0.0, eps=0.0, weight_decay=0.0, grad_clip=3.0))
  tx = ts.make_optimizer(optim)
  params = {'w': {'kernel': jnp.zeros(4)}}
  grads = {'w': {'kernel': jnp.array([30.0, 40.0, 0.0, 0.0])}}  # norm 50
  clipped, _ = optax.clip_by_global_norm(3.0).update(grads, optax.clip_by_global_norm(3.0).init(params))
  np.testing.assert_allclose(np.asarray(clipped['w']['kernel']), [1.8, 2.4, 0, 0], rtol=1e-6)
  assert tx.init(params) is not None


def test_ema_update_formula():
  ema = {'a': jnp.array(1.0)}
  new = ts.ema_update(ema, {'a': jnp.array(3.0)}, 0.9)
  np.testing.assert_allclose(float(new['a']), 0.9 * 1.0 + 0.1 * 3.0)


def test_step_loss_is_mean_of_per_image_sit_losses(mixed_step):
  """The step's loss equals an explicit recomputation from the same keys."""
  config, state, batch, (_, metrics) = mixed_step
  rng = jax.random.fold_in(state.rng, state.step)

  @jax.jit  # not eager only to keep the test fast; the computation is the same
  def recomputed(params, batch):
    return [ts._sub_batch_loss(params, state.apply_fn, sub, part['images'], part['labels'],
                               jax.random.fold_in(rng, i), config.train, 4, 10, config.model)
            for i, (sub, part) in enumerate(zip(MIXED, batch))]

  losses = recomputed(state.params, batch)
  assert [l.shape for l in losses] == [(12,), (4,)]
  np.testing.assert_allclose(float(metrics['loss']), float(jnp.concatenate(losses).mean()), rtol=1e-6)


def test_unconditional_groups_use_the_null_class_and_singles_keep_labels():
  config = tiny_config()
  seen = []

  def spy_apply(variables, x, t, y, ids, group_size=1, group_attention=True):
    seen.append((np.asarray(y), group_size, np.asarray(ids)))
    return jnp.zeros(x.shape[:-1] + (2,))

  kinds = step_plan.step_kinds(16, 4, 0.1, mixed_steps=False)
  for name in ('singles', 'groups'):
    batch = fake_batch(kinds[name])
    with jax.disable_jit():
      ts._sub_batch_loss({}, spy_apply, kinds[name][0], batch[0]['images'], batch[0]['labels'],
                         jax.random.PRNGKey(0), config.train, 4, 10, config.model)
  (y_single, n_single, ids_single), (y_group, n_group, ids_group) = seen
  assert n_single == 1 and n_group == 4
  np.testing.assert_array_equal(y_single, fake_batch(kinds['singles'])[0]['labels'])  # no label dropout
  assert (y_group == 10).all()
  assert all(sorted(row) == [0, 1, 2, 3] for row in ids_group.reshape(4, 4))


def test_plain_training_drops_labels_at_the_configured_rate():
  config = tiny_config(group_ratio=0.0, label_dropout=0.1)
  seen = []

  def spy_apply(variables, x, t, y, ids, group_size=1, group_attention=True):
    seen.append(np.asarray(y))
    return jnp.zeros_like(x)

  sub = step_plan.SubBatch(4000, 1, True)
  labels = np.zeros(4000, np.int32)
  ts._sub_batch_loss({}, spy_apply, sub, jnp.zeros((4000, 1, 1, 1)), labels, jax.random.PRNGKey(0),
                     config.train, 0, 10, config.model)
  assert abs((seen[0] == 10).mean() - 0.1) < 0.02


def test_jitted_step_on_a_mesh_matches_the_plain_step_and_lowers_the_loss(mixed_step):
  config, state, batch, (_, plain_metrics) = mixed_step
  mesh = sharding.make_mesh()
  run = ts.make_jitted_train_step(config, mesh, sharding.replicated(mesh))
  # A copy (the step donates its state) placed as train.py's state is (create_sharded_train_state): with the
  # state's sharding as the step's output has it, every step runs the one compiled program.
  jit_state, jit_metrics = run(jax.device_put(state, sharding.replicated(mesh), may_alias=False), batch, MIXED)
  np.testing.assert_allclose(float(plain_metrics['loss']), float(jit_metrics['loss']), rtol=1e-6)
  assert int(jit_state.step) == 1
  # Constant images: the velocity is learnable, so a few dozen steps (the same compiled step) must
  # lower the loss (averaged over 5 steps to smooth the random times).
  data = tuple({'images': np.full((sub.num_images, 8, 8, 1), 0.5, np.float32),
                'labels': np.zeros(sub.num_images, np.int32)} for sub in MIXED)
  losses = []
  for _ in range(40):
    jit_state, metrics = run(jit_state, data, MIXED)
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_params_gathered_in_bfloat16_give_a_bfloat16_model_the_same_loss_and_gradients():
  """The sharded update gathers the parameters in the compute dtype (train_step.gather_for_compute): exact,
  because every parameter of the model is cast to that dtype before use; the gradient keeps the float32 sum
  over a parameter's uses (here two sub-batches: singles and groups in one mixed step)."""
  config = tiny_config()
  config.model.update(dtype='bfloat16', depth=1)
  model, state = make_state(config)
  kind = step_plan.step_kinds(16, 4, 0.5, mixed_steps=True)['mixed']
  batch = fake_batch(kind)
  rounded = jax.jit(lambda params: jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params))(
      state.params)
  assert any(bool(jnp.any(r != p)) for r, p in zip(jax.tree.leaves(rounded), jax.tree.leaves(state.params)))
  args = (jnp.asarray(batch[0]['images']), jnp.full((8,), 0.5), jnp.asarray(batch[0]['labels']),
          jnp.zeros((8,), jnp.int32))
  apply = jax.jit(lambda params: model.apply({'params': params}, *args))
  np.testing.assert_array_equal(apply(state.params), apply(rounded))
  mesh = sharding.make_mesh(None, jax.devices()[:1])
  layout = ts.UpdateLayout(compute=jax.tree.map(lambda _: sharding.replicated(mesh), state.params),
                           dtype=jnp.bfloat16)
  common = dict(kind=kind, train_config=config.train, max_group_size=config.model.max_group_size,
                null_class=config.model.num_classes, model_config=config.model)
  plain = jax.jit(functools.partial(ts.loss_and_grads, **common))(state, batch)
  with sharding.use_mesh(mesh):
    gathered = jax.jit(functools.partial(ts.loss_and_grads, layout=layout, **common))(state, batch)
  assert jax.tree.map(lambda g: g.dtype, gathered[1]) == jax.tree.map(lambda g: g.dtype, plain[1])
  for a, b in zip(jax.tree.leaves(gathered), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
