"""Fine-tuning "from pretrained": train.init_from starts a new run at step 0 from imported weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import digits
from groupdiff_jax import checkpoint, convert, converted, train
from groupdiff_jax import train_step as train_step_lib
from groupdiff_jax.models import dit
from tests import test_convert

# The digits demo shrunk: SiT-S/4 of depth 1, width 32 on 16x16x1 images, 10 classes.
# Singles only (group_ratio 0: one small step kind, one compilation) and no neighbour search.
TINY = {'model.depth': 1, 'model.hidden_size': 32, 'model.num_heads': 2, 'train.batch_size': 8,
        'train.log_every': 1, 'train.checkpoint_every': 100, 'train.group_ratio': 0.0, 'data.grouping': 'class'}
ARCH = dict(depth=1, hidden=32, patch=4, in_ch=1, classes=10, input_size=16)


def tiny_config(**overrides):
  config = digits.get_config()
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


def converted_plain_sit(tmp_path, name='converted', **arch):
  """A plain SiT state dict (no sample embedding) imported with a fresh sample table of 4 rows (seed 7)."""
  arch = {**ARCH, **arch}
  sd = test_convert.official_state_dict(seed=11, max_group_size=0, **arch)
  source = test_convert.save(sd, tmp_path, 'safetensors', f'{name}_source')
  output = tmp_path / name
  convert.convert_checkpoint(source, output, 'SiT-S/4', max_group_size=4, seed=7, input_size=16, in_channels=1,
                             num_classes=10, model_overrides=dict(depth=1, hidden_size=arch['hidden'], num_heads=2))
  return str(output)


@pytest.fixture(scope='module')
def fresh_state():
  """A train state of the tiny config with random leaves (shapes from eval_shape: no model compilation)."""
  config = tiny_config()
  create = functools.partial(train_step_lib.create_train_state, dit.model_from_config(config.model), config)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape).astype(leaf.dtype)),
                      jax.eval_shape(create, jax.random.PRNGKey(0)))


def flat(tree):
  return {'/'.join(k.key for k in path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_training_from_converted_weights_starts_at_step_0_with_the_imported_params(tmp_path, monkeypatch):
  imported = flat(converted.load_converted_params(converted_plain_sit(tmp_path)))
  assert imported['sample_embedder/embedding_table/embedding'].std() > 0  # the converter's fresh table
  first = []
  make_step = train_step_lib.make_jitted_train_step

  def recording_step(config, mesh, state_sharding):
    run = make_step(config, mesh, state_sharding)

    def step(state, batch, kind):
      if not first:  # the state the first update sees (copied: the step donates it)
        first.append(jax.device_get((state.step, state.params, state.ema_params, state.opt_state)))
      return run(state, batch, kind)
    return step

  monkeypatch.setattr(train_step_lib, 'make_jitted_train_step', recording_step)
  config = tiny_config(**{'train.num_steps': 2, 'train.init_from': str(tmp_path / 'converted')})
  final = train.train_and_evaluate(config, str(tmp_path / 'finetune'))

  step, params, ema_params, opt_state = first[0]
  assert int(step) == 0
  for name, value in imported.items():  # every param, the sample embedding included
    np.testing.assert_array_equal(flat(params)[name], value, err_msg=name)
    np.testing.assert_array_equal(flat(ema_params)[name], value, err_msg=name)
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(opt_state))  # fresh AdamW moments and count
  assert int(final.step) == 2
  moved = flat(final.params)
  assert any(np.abs(moved[name] - value).max() > 0 for name, value in imported.items())


def test_a_plain_run_without_sample_embedding_keeps_the_fresh_table(tmp_path, caplog, fresh_state):
  state = fresh_state
  plain = state.replace(params={k: v for k, v in state.params.items() if k != 'sample_embedder'})
  plain = plain.replace(ema_params=jax.tree.map(lambda x: x + 1.0, plain.params))
  manager = checkpoint.checkpoint_manager(tmp_path / 'plain')
  manager.save(3, args=ocp.args.StandardSave({'params': plain.params, 'ema_params': plain.ema_params}))
  manager.wait_until_finished()

  loaded = checkpoint.init_params_from(state, str(tmp_path / 'plain'))
  np.testing.assert_array_equal(loaded.params['x_embedder']['proj']['kernel'],
                                np.asarray(state.params['x_embedder']['proj']['kernel']) + 1.0)  # the EMA weights
  np.testing.assert_array_equal(loaded.params['sample_embedder']['embedding_table']['embedding'],
                                state.params['sample_embedder']['embedding_table']['embedding'])
  assert 'sample_embedder/embedding_table/embedding' in caplog.text and 'fresh' in caplog.text


def test_init_from_without_a_checkpoint_or_of_another_shape_is_an_error_naming_the_path(tmp_path, fresh_state):
  state = fresh_state
  with pytest.raises(FileNotFoundError, match=f'train.init_from=.*{tmp_path / "nowhere"}.*convert'):
    checkpoint.init_params_from(state, str(tmp_path / 'nowhere'))
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
    checkpoint.init_params_from(state, str(tmp_path / 'empty'))
  wide = converted_plain_sit(tmp_path, 'wide', hidden=64)
  with pytest.raises(ValueError) as info:
    checkpoint.init_params_from(state, wide)
  message = str(info.value)
  assert 'wide' in message and 'blocks_0/attn/qkv/kernel: expected (32, 96), found (64, 192)' in message
