"""The mixed GroupDiff-l step against a NumPy reading of the official per-GPU averaging.

Official (dataset/cluster_data.py, create_epoch_plan and partition_batch_plan;
PyTorch DDP): the epoch plan holds `sequence` batches (P/N groups of N) and
`direct` batches (P singles) of P images each, about `ratio` of the images
in groups; the shuffled plan, cut to a multiple of the W GPUs, is dealt
round-robin (rank = position mod W), so optimizer step j holds plan items
j*W .. j*W + W - 1, and its loss is the mean over ranks of each rank's mean
per-image loss (DDP averages the gradients).
"""

import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax import step_plan
from groupdiff_jax import train_step as ts


def official_epoch_plan(num_images, ratio, group_size, per_gpu, rng):
  """Kinds of the plan's batches ('sequence' / 'direct'), shuffled, as create_epoch_plan sizes them."""
  sequences = int(num_images * ratio / group_size)
  sequence_batches = sequences // (per_gpu // group_size)
  direct_batches = (num_images - sequence_batches * per_gpu) // per_gpu
  plan = np.array(['sequence'] * sequence_batches + ['direct'] * direct_batches)
  return plan[rng.permutation(len(plan))]


def official_steps(plan, world_size):
  """partition_batch_plan: rank r takes items i with i % W == r; step j holds items j*W .. j*W + W-1."""
  kept = plan[:len(plan) // world_size * world_size]
  per_rank = [kept[rank::world_size] for rank in range(world_size)]
  return np.stack(per_rank, axis=1)  # [steps, W]


def official_step_loss(per_gpu_losses):
  """Mean over ranks of each rank's mean loss: [W, P] -> scalar."""
  return np.mean([np.mean(losses) for losses in per_gpu_losses])


def test_mixed_step_weights_each_image_as_the_official_step():
  world, per_gpu, n = 8, 32, 4
  rng = np.random.default_rng(0)
  steps = official_steps(official_epoch_plan(25_600, 0.1, n, per_gpu, rng), world)
  mixed = [row for row in steps if 0 < (row == 'sequence').sum() < world]
  assert mixed, 'the official plan holds steps with both kinds'
  for row in mixed[:5]:
    losses = rng.exponential(size=(world, per_gpu)).astype(np.float32)
    is_group = row == 'sequence'
    official = official_step_loss(losses)
    # The same images as our two sub-batches: singles, then groups.
    parts = [jnp.asarray(losses[~is_group].ravel()), jnp.asarray(losses[is_group].ravel())]
    ours = float(ts.step_loss(parts))
    # float32 sums of 256 values in [0, ~10]: rounding below 256 * eps * max
    np.testing.assert_allclose(ours, official, rtol=0, atol=world * per_gpu * np.finfo(np.float32).eps * losses.max())
    # Each image's weight (d loss / d loss_i) is 1/(W*P) officially and 1/B here.
    weights = jax.grad(ts.step_loss)(parts)
    for w in weights:
      np.testing.assert_allclose(np.asarray(w), 1.0 / (world * per_gpu), rtol=1e-6)


def test_mixed_step_group_share_is_the_official_mean_share():
  world, per_gpu, n, ratio = 8, 32, 4, 0.1
  batch = world * per_gpu
  shares = []
  for seed in range(5):
    steps = official_steps(official_epoch_plan(60_000, ratio, n, per_gpu, np.random.default_rng(seed)), world)
    shares.append((steps == 'sequence').mean(axis=1))  # group-image share of each official step
  official = np.concatenate(shares)
  assert official.std() > 0  # official steps vary: a random number of the W batches are groups
  kinds = step_plan.step_kinds(batch, n, ratio)
  (singles, groups), = kinds.values()
  ours = groups.num_images / batch
  assert singles.conditional and singles.group_size == 1 and not groups.conditional and groups.group_size == n
  # ours is the nearest whole number of groups to the mean: within half a group of it
  assert abs(ours - official.mean()) <= n / (2 * batch) + 1.0 / per_gpu / world
