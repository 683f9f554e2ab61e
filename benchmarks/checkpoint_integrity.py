"""CPU benchmark: the cost of checkpoint integrity (per-shard CRC-32C) and of the update's non-finite guard.

  JAX_PLATFORMS=cpu python benchmarks/checkpoint_integrity.py [--megabytes=512 --repeats=3 --guard_depth=4]

Checksums: a train-state-like tree of float32 leaves of `--megabytes` in
total (leaves of SiT-B's largest shapes) is saved with orbax as train.py
saves (StandardSave, wait until finished) and, in the same process, its
CRC-32C tables are computed (checkpoint.shard_checksums, the work
checkpoint.save adds) and verified after a restore
(checkpoint.integrity_problem: CRC + finiteness). Both scale with the bytes,
so the ratio carries over to a larger state; the SiT-XL/2 line extrapolates
the measured throughputs linearly to 675M params x 4 copies (params, EMA,
Adam mu and nu) = 10.8 GB.

Guard: the jitted train step of a small SiT (digits config, `--guard_depth`
blocks of width 384, batch 16) with and without the update check
(train_step.train_step(check_update=...)), timed alternately in one
process; best and median of `--repeats` x 10 steps.
"""

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from groupdiff_jax import checkpoint, step_plan, train_step  # noqa: E402

XL_BYTES = 675e6 * 4 * 4  # SiT-XL/2 params x (params, EMA, mu, nu) x float32


def state_tree(megabytes):
  """{'leaf_i': float32 [1152, 4608]-ish} of about `megabytes` MB (random: incompressible, as trained weights)."""
  rng = np.random.default_rng(0)
  shape = (768, 3072)  # SiT-B's MLP kernel
  count = max(1, int(megabytes * 2**20 // (4 * np.prod(shape))))
  return {f'leaf_{i}': jnp.asarray(rng.standard_normal(shape, np.float32)) for i in range(count)}


def time_checksums(megabytes, repeats):
  tree = state_tree(megabytes)
  total = sum(x.nbytes for x in jax.tree.leaves(tree))
  directory = tempfile.mkdtemp(prefix='ckpt_bench_')
  saves, sums, restores, verifies = [], [], [], []
  try:
    for r in range(repeats):
      options = ocp.CheckpointManagerOptions(create=True)
      manager = ocp.CheckpointManager(os.path.join(directory, str(r)), options=options)
      start = time.perf_counter()
      manager.save(1, args=ocp.args.StandardSave(tree))
      manager.wait_until_finished()
      saves.append(time.perf_counter() - start)
      start = time.perf_counter()
      table = checkpoint.shard_checksums(tree)
      sums.append(time.perf_counter() - start)
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
      start = time.perf_counter()
      restored = manager.restore(1, args=ocp.args.StandardRestore(abstract))
      jax.block_until_ready(restored)
      restores.append(time.perf_counter() - start)

      class Saved:  # integrity_problem reads the table from the metadata; give it the one just computed
        def metadata(self, step):
          return type('M', (), {'custom_metadata': {'checksums': table,
                                                    'checksum_algorithm': checkpoint.CHECKSUM_ALGORITHM}})()
      start = time.perf_counter()
      assert checkpoint.integrity_problem(Saved(), 1, restored) is None
      verifies.append(time.perf_counter() - start)
      shutil.rmtree(os.path.join(directory, str(r)))
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  save, crc, restore, verify = (float(np.median(v)) for v in (saves, sums, restores, verifies))
  return {'state_MB': round(total / 2**20, 1), 'save_s': round(save, 3), 'checksum_s': round(crc, 3),
          'checksum_over_save': round(crc / save, 4), 'restore_s': round(restore, 3),
          'verify_s': round(verify, 3), 'verify_over_restore': round(verify / restore, 4),
          'crc_GB_per_s': round(total / crc / 1e9, 2), 'save_GB_per_s': round(total / save / 1e9, 2),
          'extrapolated_sit_xl2_10.8GB': {'save_s': round(XL_BYTES / (total / save), 1),
                                          'checksum_s': round(XL_BYTES / (total / crc), 1)}}


def time_guard(depth, repeats):
  from configs import digits
  from groupdiff_jax.data.digits import DigitsBatches
  from groupdiff_jax.models.dit import model_from_config
  config = digits.get_config()
  config.update_from_flattened_dict({'model.depth': depth, 'model.hidden_size': 384, 'model.num_heads': 6,
                                     'train.batch_size': 16, 'train.group_ratio': 0.0})
  state = train_step.create_train_state(model_from_config(config.model), config, jax.random.PRNGKey(0))
  (kind,) = step_plan.step_kinds(16, 4, 0.0).values()
  data_config = config.copy_and_resolve_references()
  data_config.train.batch_size, data_config.data.grouping = 16, 'random'
  batch = DigitsBatches(data_config, seed=0).batch(0, kind)
  steps = {check: jax.jit(functools.partial(train_step.train_step, kind=kind, train_config=config.train,
                                            optim_config=config.optim, max_group_size=config.model.max_group_size,
                                            null_class=config.model.num_classes, model_config=config.model,
                                            check_update=check))
           for check in (False, True, 'state')}
  states = {check: jax.block_until_ready(steps[check](state, batch)[0]) for check in steps}  # compile
  times = {False: [], True: [], 'state': []}
  for _ in range(repeats):
    for check in (False, True, 'state'):  # alternate: load changes hit both alike
      s = states[check]
      start = time.perf_counter()
      for _ in range(10):
        s, metrics = steps[check](s, batch)
      jax.block_until_ready(s)
      times[check].append((time.perf_counter() - start) / 10)
      states[check] = s
  params = sum(x.size for x in jax.tree.leaves(state.params))
  off, on = (float(np.median(times[c])) for c in (False, True))
  return {'params': params, 'step_ms_guard_off': round(1e3 * off, 2), 'step_ms_guard_on': round(1e3 * on, 2),
          'best_ms_off': round(1e3 * min(times[False]), 2), 'best_ms_on': round(1e3 * min(times[True]), 2),
          'on_over_off_median': round(on / off, 4), 'on_over_off_best': round(min(times[True]) / min(times[False]), 4),
          'full_state_check_over_off_median': round(float(np.median(times['state'])) / off, 4)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--megabytes', type=float, default=512)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--guard_depth', type=int, default=4)
  parser.add_argument('--parts', default='checksum,guard')
  args = parser.parse_args()
  parts = args.parts.split(',')
  results = {}
  if 'checksum' in parts:
    results['checksum'] = time_checksums(args.megabytes, args.repeats)
  if 'guard' in parts:
    results['guard'] = time_guard(args.guard_depth, args.repeats)
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
