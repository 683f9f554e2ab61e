"""Checks of a training run's inputs that need no compute: run them first.

Each error names the offending value or path and what to do. Checks that
belong to one module stay there and are only called from here:
`step_plan.step_kinds` (batch vs group sizes, mode, ratio),
`sharding.make_mesh` (mesh vs device count) and
`sharding.check_groups_fit_mesh` (groups vs devices, hence hosts). Unknown
config keys are refused by ml_collections itself (`--config.train.x=`
fails while parsing the flags, naming the key).
"""

import os
import tempfile

from groupdiff_jax import errors, sharding, step_plan


class WorkdirError(errors.UserError, PermissionError):
  """--workdir cannot be created or written."""


def check_workdir_writable(workdir):
  """Create `workdir` if needed and write (then remove) a file in it."""
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test_'):
      pass
  except OSError as error:
    raise WorkdirError(f'--workdir={path} is not a writable directory ({error.strerror or error}); choose '
                          f'another --workdir or fix its permissions.') from error


def check_group_size(config):
  """One sample-embedding row per group member: group_size <= model.max_group_size."""
  group_size, max_group_size = config.train.group_size, config.model.max_group_size
  if max_group_size > 0 and group_size > max_group_size:
    raise errors.ConfigError(f'train.group_size={group_size} exceeds model.max_group_size={max_group_size} (one '
                     f'sample-embedding row per member); lower train.group_size or raise model.max_group_size.')


def check_before_training(config, workdir, mesh):
  """Every check of `train.train_and_evaluate`'s inputs; returns the step kinds.

  Args:
    config: the run's ConfigDict.
    workdir: where checkpoints and metrics go (created here).
    mesh: the device mesh (sharding.make_mesh already checked it against
      the device count).
  """
  check_workdir_writable(workdir)
  check_group_size(config)
  kinds = step_plan.step_kinds(config.train.batch_size, config.train.group_size, config.train.group_ratio,
                               config.train.mode, config.train.mixed_steps)
  for kind in kinds.values():
    sharding.check_groups_fit_mesh(kind, mesh)
  return kinds
