"""Which kind of batch each training step holds (GroupDiff-l / -f).

Official GroupDiff-l (docs/method.md, Training composition): the epoch
plan holds *singles* batches (group size 1, labels kept) and *unconditional
group* batches (groups of N, every label the null class) of the same number
of images, about `group_ratio` of the images in groups (they are the CFG
dropout); the shuffled plan is dealt round-robin to the GPUs and each
optimizer step averages the per-GPU mean losses, so every official step
mixes both kinds and weights every image 1/B. The default here is the
closest static-shape form, the *mixed* step: both kinds in every step as
two sub-batches, the groups holding the multiple of N nearest to
group_ratio * B (at least one group and one conditional part), each image
weighted 1/B (train_step.step_loss). The official share of group images
varies from step to step (a random number of the W per-GPU batches) around
that mean; a static shape cannot. `mixed_steps=False` alternates pure
singles steps and pure group steps instead (our earlier default).
GroupDiff-f (paper): the conditional images are grouped too.

Each kind is a tuple of `SubBatch`es: hashable, so the jitted train step
takes it as a static argument and compiles once per kind. The plan is a
pure function of (seed, step): every host computes the same kind without
communicating, and a resumed run sees the kinds an uninterrupted run would.
"""

import dataclasses

import numpy as np

from groupdiff_jax import errors

SINGLES = 'singles'
GROUPS = 'groups'
MIXED = 'mixed'


@dataclasses.dataclass(frozen=True)
class SubBatch:
  """A part of a step's batch with one static shape.

  num_images: images in this part (a multiple of group_size).
  group_size: N members per group; 1 for singles.
  conditional: labels kept; False replaces every label by the null class.
  """
  num_images: int
  group_size: int
  conditional: bool

  @property
  def num_groups(self):
    return self.num_images // self.group_size


def step_kinds(batch_size, group_size, group_ratio, mode='groupdiff_l', mixed_steps=True):
  """The step kinds of a run: name -> tuple of SubBatch.

  Args:
    batch_size: images per step (global).
    group_size: N of the unconditional groups (and of conditional groups in
      GroupDiff-f).
    group_ratio: fraction of the images that are in unconditional groups.
    mode: 'groupdiff_l' (conditional singles) or 'groupdiff_f' (conditional
      groups of N as well).
    mixed_steps: hold both parts in every step (official composition,
      default) instead of alternating pure steps of each kind.
  """
  if mode not in ('groupdiff_l', 'groupdiff_f'):
    raise errors.ConfigError(f"Unknown train.mode={mode!r}; use 'groupdiff_l' or 'groupdiff_f'.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise errors.ConfigError(f'train.batch_size={batch_size!r} must be a positive integer (images per step).')
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0:
    raise errors.ConfigError(f'train.group_size={group_size!r} must be a positive integer (images per group), '
                             f'e.g. 4.')
  if not 0.0 <= group_ratio <= 1.0:
    raise errors.ConfigError(f'train.group_ratio={group_ratio} must be in [0, 1].')
  cond_group_size = group_size if mode == 'groupdiff_f' else 1
  if (group_ratio > 0 or cond_group_size > 1) and batch_size % group_size:
    below = batch_size // group_size * group_size
    nearest = ' and '.join(str(size) for size in (below, below + group_size) if size > 0)
    raise errors.ConfigError(f'train.batch_size={batch_size} is not whole groups of train.group_size={group_size}; '
                             f'the nearest batch sizes that are: {nearest}.')
  conditional = SubBatch(batch_size, cond_group_size, True)
  if group_ratio == 0:
    return {SINGLES: (conditional,)}
  if mixed_steps and group_ratio == 1:
    return {GROUPS: (SubBatch(batch_size, group_size, False),)}
  if mixed_steps:
    group_images = mixed_group_images(batch_size, group_size, group_ratio, cond_group_size)
    cond_images = batch_size - group_images
    if cond_images % cond_group_size:
      raise errors.ConfigError(f'{cond_images} conditional images per mixed step are not whole groups of {cond_group_size}.')
    return {MIXED: (SubBatch(cond_images, cond_group_size, True), SubBatch(group_images, group_size, False))}
  return {SINGLES: (conditional,), GROUPS: (SubBatch(batch_size, group_size, False),)}


def mixed_group_images(batch_size, group_size, group_ratio, cond_group_size=1):
  """Images in the unconditional groups of a mixed step.

  The multiple of group_size nearest to group_ratio * batch_size, kept
  within [group_size, batch_size - cond_group_size] so that both parts
  exist (a small batch cannot hold the ratio exactly: 16 images at 0.1 in
  groups of 4 hold one group, 25%).
  """
  nearest = int(round(group_ratio * batch_size / group_size)) * group_size
  group_images = min(max(nearest, group_size), batch_size - cond_group_size)
  group_images -= group_images % group_size
  if group_images < group_size:
    raise errors.ConfigError(f'Mixed steps of {batch_size} images leave no room for a group of {group_size} beside '
                             f'the conditional part; raise train.batch_size or pass --config.train.mixed_steps=False.')
  return group_images


def group_steps_per_block(group_ratio, block_length):
  return int(round(group_ratio * block_length))


def step_kind_name(seed, step, kinds, group_ratio, block_length=100):
  """The kind of step `step`: a key of `kinds`, the same on every host.

  When steps alternate between singles and groups, each block of
  `block_length` consecutive steps holds exactly
  round(group_ratio * block_length) group steps at positions drawn from
  (seed, block), so the ratio is exact over every block, not only on
  average.
  """
  if len(kinds) == 1:
    return next(iter(kinds))
  block, position = divmod(int(step), block_length)
  order = np.random.default_rng([int(seed), block, 0x9D]).permutation(block_length)
  is_group = order[position] < group_steps_per_block(group_ratio, block_length)
  return GROUPS if is_group else SINGLES
