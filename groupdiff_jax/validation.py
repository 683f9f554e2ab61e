"""Checks of a training run's inputs that need no compute: run them first.

Each error names the offending value or path and what to do. Checks that
belong to one module stay there and are only called from here:
`step_plan.step_kinds` (batch vs group sizes, mode, ratio),
`sharding.make_mesh` (mesh vs device count) and
`sharding.check_groups_fit_mesh` (groups vs devices, hence hosts). Unknown
config keys are refused by ml_collections itself (`--config.train.x=`
fails while parsing the flags, naming the key).
"""

import uuid

from groupdiff_jax import errors, sharding, step_plan, storage


class WorkdirError(errors.UserError, PermissionError):
  """--workdir cannot be created or written."""


def check_workdir_writable(workdir):
  """Create `workdir` if needed (a local folder or a bucket prefix) and write (then remove) a file in it.

  Transient storage faults are retried (storage.retry); a folder it had to create is removed again when the
  check fails, so that a refused command leaves nothing behind.
  """
  path = storage.path(workdir)
  created = not storage.retry(path.exists, path)
  probe = path / f'.write_test_{uuid.uuid4().hex}'
  try:
    storage.retry(lambda: path.mkdir(parents=True, exist_ok=True), path)
    storage.retry(lambda: probe.write_bytes(b''), probe)
    storage.retry(probe.unlink, probe)
  except errors.StorageUnavailable:
    raise
  except Exception as error:  # OSError locally; tf.errors.* (PermissionDenied...) for a bucket
    if created and not storage.is_remote(path):
      try:
        path.rmdir()
      except OSError:
        pass
    reason = getattr(error, 'strerror', None) or storage.first_line(error)
    raise WorkdirError(f'--workdir={path} is not a writable directory ({reason}); choose '
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
