"""Checkpoint integrity: per-shard CRC-32C, finite leaves, and save failures that surface at once."""

import glob
import json
import logging
import os
import zlib

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from groupdiff_jax import checkpoint, train, train_step
from groupdiff_jax.models.dit import model_from_config
from tests import test_nonfinite
from tests.test_checkpoint import save_steps, tiny_state
from tests.test_resume import assert_trees_equal, tiny_config


def largest_file(path):
  files = [f for f in glob.glob(os.path.join(path, '**', '*'), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def flip_bytes(path, count=3):
  """XOR `count` bytes in the middle of the file (bit rot that keeps its size and its format)."""
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    for offset in range(count):
      data[middle + 7 * offset] ^= 0xA5
    f.seek(0)
    f.write(data)


def test_bit_rot_in_the_latest_checkpoint_falls_back_and_resumes_exactly(tmp_path, caplog):
  config = lambda: tiny_config(**{'train.num_steps': 4, 'train.checkpoint_every': 2})
  workdir = str(tmp_path / 'rotten')
  whole = jax.device_get(train.train_and_evaluate(config(), workdir))  # the run's state in memory, never reread
  latest = os.path.join(workdir, 'checkpoints', '4')
  flip_bytes(largest_file(latest))
  with caplog.at_level(logging.WARNING):
    resumed = train.train_and_evaluate(config(), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any(latest in m and os.path.join(workdir, 'checkpoints', '2') in m for m in warnings), warnings
  assert os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))  # moved aside
  for field in checkpoint.SAVED_FIELDS:  # it resumed from step 2 and trained to 4 as the uninterrupted run
    assert_trees_equal(getattr(whole, field), getattr(resumed, field))


def read_metadata(workdir, step):
  """(path, parsed JSON) of checkpoint `step`'s orbax metadata file."""
  path = os.path.join(workdir, 'checkpoints', str(step), '_CHECKPOINT_METADATA')
  with open(path) as f:
    return path, json.load(f)


def test_a_checksum_mismatch_names_the_leaf_and_falls_back(tmp_path, caplog):
  workdir = str(tmp_path)
  save_steps(workdir, [2, 4])
  metadata_path, metadata = read_metadata(workdir, 4)
  saved = metadata['custom_metadata']
  assert saved['step'] == 4 and saved['code_version'] and 'config' in saved
  leaf = 'params/dense/kernel'
  (index,) = saved['checksums'][leaf]
  saved['checksums'][leaf][index] ^= 1  # what the array bytes of a rotten file no longer match
  with open(metadata_path, 'w') as f:
    json.dump(metadata, f)
  with caplog.at_level(logging.WARNING):
    state = checkpoint.restore_latest(checkpoint.checkpoint_manager(workdir), tiny_state())
  assert int(state.step) == 2
  assert any('checkpoints/4' in r.getMessage() and leaf in r.getMessage() and 'checksum' in r.getMessage()
             for r in caplog.records), caplog.text


def test_the_checksum_is_crc32c():
  # The standard check value of CRC-32C (Castagnoli), RFC 3720 appendix B.4: "123456789" -> 0xE3069283.
  assert checkpoint.CHECKSUMS['crc32c'](np.frombuffer(b'123456789', np.uint8)) == 0xE3069283


def test_saved_checksums_are_the_crc32c_of_each_shards_bytes(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [3])
  metadata = checkpoint.checkpoint_manager(workdir).metadata(3).custom_metadata
  kernel = np.full((4, 3), 3.0, np.float32)  # tiny_state(3, 3.0)'s kernel
  assert metadata['checksum_algorithm'] == 'crc32c'
  assert metadata['checksums']['params/dense/kernel'] == {'0:4,0:3': google_crc32c.value(kernel.tobytes())}


def test_a_checkpoint_with_zlib_crc32_tables_and_no_algorithm_still_verifies(tmp_path):
  """Checkpoints written before CRC-32C carry zlib CRC-32 tables and no 'checksum_algorithm'."""
  workdir = str(tmp_path)
  save_steps(workdir, [2, 4])
  metadata_path, metadata = read_metadata(workdir, 4)
  saved = metadata['custom_metadata']
  del saved['checksum_algorithm']
  kernel = np.full((4, 3), 4.0, np.float32)  # tiny_state(4, 4.0)'s kernel
  saved['checksums']['params/dense/kernel'] = {'0:4,0:3': zlib.crc32(kernel.tobytes())}
  for name in saved['checksums']:  # every table as the old code wrote it
    if name != 'params/dense/kernel':
      saved['checksums'][name] = {}
  with open(metadata_path, 'w') as f:
    json.dump(metadata, f)
  state = checkpoint.restore_latest(checkpoint.checkpoint_manager(workdir), tiny_state())
  assert int(state.step) == 4
  saved['checksums']['params/dense/kernel']['0:4,0:3'] ^= 1  # and a wrong zlib CRC is still caught
  with open(metadata_path, 'w') as f:
    json.dump(metadata, f)
  state = checkpoint.restore_latest(checkpoint.checkpoint_manager(workdir), tiny_state())
  assert int(state.step) == 2


def poisoned_mu(state):
  """`state` with a NaN in Adam's first moment of the kernel."""
  adam = state.opt_state[0]
  mu = jax.tree.map(lambda x: x, adam.mu)
  mu['dense']['kernel'] = mu['dense']['kernel'].at[0, 0].set(jnp.nan)
  return state.replace(opt_state=(adam._replace(mu=mu),) + tuple(state.opt_state[1:]))


def test_a_checkpoint_with_nan_in_the_optimizer_state_is_refused(tmp_path, caplog):
  workdir = str(tmp_path)
  save_steps(workdir, [2])
  manager = checkpoint.checkpoint_manager(workdir)
  checkpoint.save(manager, poisoned_mu(tiny_state(4, 4.0)))
  manager.wait_until_finished()
  with caplog.at_level(logging.WARNING):
    state = checkpoint.restore_latest(checkpoint.checkpoint_manager(workdir), tiny_state())
  assert int(state.step) == 2
  assert any('checkpoints/4' in r.getMessage() and 'opt_state/0/mu/dense/kernel' in r.getMessage()
             and 'non-finite' in r.getMessage() for r in caplog.records), caplog.text


def test_all_finite_looks_at_every_floating_leaf():
  assert bool(train_step.all_finite({'a': jnp.ones(3), 'n': jnp.arange(3)}))
  assert not bool(train_step.all_finite({'a': jnp.ones(3), 'b': (jnp.array([1.0, jnp.inf]),)}))
  assert not bool(train_step.all_finite([jnp.zeros((2, 2)), jnp.full((5,), jnp.nan)]))


def test_the_train_step_skips_and_counts_a_step_with_nan_in_mu():
  config = tiny_config(**{'train.group_ratio': 0.0})
  state = train_step.create_train_state(model_from_config(config.model), config, jax.random.PRNGKey(0))
  adam = state.opt_state[-1][0]  # chain(clip, adamw): adamw = chain(scale_by_adam, ...)
  name = next(iter(adam.mu))
  mu = jax.tree.map(lambda x: x, adam.mu)
  first = jax.tree.leaves(mu[name])[0]
  mu[name] = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x is first else x, mu[name])
  opt_state = state.opt_state[:-1] + ((adam._replace(mu=mu),) + tuple(state.opt_state[-1][1:]),)
  state = state.replace(opt_state=opt_state)
  step, batch = test_nonfinite.jitted_step_and_batch(config)
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))  # only the update is NaN
  assert int(metrics['nonfinite']) == 1 and int(new.step) == 1
  for field in ('params', 'ema_params', 'opt_state'):
    assert_trees_equal(getattr(new, field), getattr(state, field))


def failing_finalize(counter):
  async def finalize(self, *args, **kwargs):
    counter['failed_at'] = counter['steps']
    raise OSError(28, 'No space left on device', str(self._final_path))
  return finalize


def test_a_failed_save_stops_the_run_at_once_with_the_path_and_the_os_error_last(tmp_path, monkeypatch):
  counter = {'steps': 0}
  make = train_step.make_jitted_train_step

  def counting(*args, **kwargs):
    run = make(*args, **kwargs)

    def step(*a):
      counter['steps'] += 1
      return run(*a)
    return step

  monkeypatch.setattr(train_step, 'make_jitted_train_step', counting)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', failing_finalize(counter))
  workdir = str(tmp_path)
  with pytest.raises(checkpoint.CheckpointSaveError) as raised:
    train.train_and_evaluate(tiny_config(**{'train.num_steps': 40, 'train.checkpoint_every': 4}), workdir)
  message = str(raised.value)
  assert len(message.splitlines()) == 1 and os.path.join(workdir, 'checkpoints') in message
  assert message.endswith('No space left on device')
  # Reported by the check after the step in flight when the write failed, or the one after it.
  assert counter['steps'] - counter['failed_at'] <= 2, counter


def test_an_error_in_the_loop_finishes_the_in_flight_save_first(tmp_path):
  overrides = {'train.group_ratio': 0.0, 'train.num_steps': 10, 'train.checkpoint_every': 2, 'train.poison_step': 2,
               'data.grouping': 'random', 'train.max_nonfinite_steps': 1}
  with pytest.raises(FloatingPointError):
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  manager = checkpoint.checkpoint_manager(str(tmp_path))
  assert manager.all_steps() == [2]  # written completely before the error left the loop
  _, restored = checkpoint._restore_newest_valid(manager, checkpoint.ocp.args.StandardRestore(), move_aside=False)
  assert int(restored['step']) == 2


def test_tensorstores_write_error_is_reported_as_the_path_and_the_os_error():
  # What tensorstore raised on a full tmpfs (orbax 0.12.8, tensorstore 0.1.86), abridged.
  error = ValueError('RESOURCE_EXHAUSTED: Error writing "ema_params.final_layer.linear.bias/0" in OCDBT database at '
                     'local file "/w/checkpoints/4.tmp/ocdbt.process_0/": Failed writing: "/w/checkpoints/4.tmp/d/48": '
                     "Failed to write 286635 bytes to file 15: No space left on device [os_error_code='28']")
  manager = type('Manager', (), {'directory': '/w/checkpoints'})()
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = error
  message = str(checkpoint.save_error(manager, wrapped))
  assert message.startswith('Saving a checkpoint in /w/checkpoints failed')
  assert message.endswith('/w/checkpoints/4.tmp/d/48: [Errno 28] No space left on device')
  assert checkpoint.save_error(manager, ValueError('a bug')) is None  # not storage: re-raised with its traceback
