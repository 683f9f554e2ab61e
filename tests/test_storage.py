"""The path layer's fault handling (groupdiff_jax/storage.py) and what it changes in checkpoint.py: a storage
fault is retried, then exit 75, and never moves a checkpoint aside. No wall-clock waits: storage.sleep is
replaced. The same against a real GCS API: tests/test_gcs_workdir.py."""

import os

import orbax.checkpoint as ocp
import pytest

from groupdiff_jax import checkpoint, errors, storage, validation
from tests.test_checkpoint import save_steps, tiny_state


@pytest.fixture
def waits(monkeypatch):
  recorded = []
  monkeypatch.setattr(storage, 'sleep', recorded.append)
  return recorded


@pytest.mark.parametrize('error', [
    TimeoutError('read timed out'), ConnectionResetError(104, 'Connection reset by peer'),
    ValueError('UNAVAILABLE: HTTP response code 503 with body ...'),
    RuntimeError('All 1 retry attempts failed. The last failure: HTTP response code 429'),
    OSError('DEADLINE_EXCEEDED: gs://b/x')])
def test_transient_errors_are_recognised(error):
  assert storage.is_transient(error)
  wrapped = RuntimeError('restore failed')
  wrapped.__cause__ = error
  assert storage.is_transient(wrapped)


@pytest.mark.parametrize('error', [FileNotFoundError(2, 'No such file'), PermissionError(13, 'Permission denied'),
                                   ValueError('DATA_LOSS: checksum mismatch'), KeyError('params')])
def test_other_errors_are_not_transient(error):
  assert not storage.is_transient(error)


def test_retry_backs_off_exponentially_then_raises_storage_unavailable(waits, caplog):
  calls = []

  def down():
    calls.append(1)
    raise TimeoutError('timed out')
  with pytest.raises(errors.StorageUnavailable) as raised:
    storage.retry(down, 'gs://b/run/checkpoints/4')
  assert len(calls) == storage.RETRIES + 1
  assert waits == [storage.FIRST_WAIT_S * 2 ** i for i in range(storage.RETRIES)]
  assert 'gs://b/run/checkpoints/4' in str(raised.value) and 'rerun' in str(raised.value)
  assert not isinstance(raised.value, errors.UserError)  # exit 75, not 2
  assert sum('gs://b/run/checkpoints/4' in r.getMessage() for r in caplog.records) == storage.RETRIES


def test_retry_returns_once_storage_is_back_and_raises_other_errors_at_once(waits):
  answers = iter([ConnectionRefusedError(111, 'Connection refused'), 'value'])

  def flaky():
    answer = next(answers)
    if isinstance(answer, Exception):
      raise answer
    return answer
  assert storage.retry(flaky, 'x') == 'value' and waits == [storage.FIRST_WAIT_S]
  with pytest.raises(PermissionError):
    storage.retry(lambda: (_ for _ in ()).throw(PermissionError(13, 'denied')), 'x')
  assert len(waits) == 1


def test_a_timeout_while_restoring_moves_nothing_and_exits_75(tmp_path, waits, monkeypatch):
  save_steps(str(tmp_path), [2, 4])
  original = ocp.CheckpointManager.restore

  def restore(self, step, *args, **kwargs):
    if step == 4:
      raise TimeoutError(f'reading step {step} timed out')
    return original(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', restore)
  manager = checkpoint.checkpoint_manager(str(tmp_path))
  with pytest.raises(errors.StorageUnavailable):
    checkpoint.restore_latest(manager, tiny_state())
  assert len(waits) == storage.RETRIES
  assert manager.all_steps() == [2, 4] and not os.path.exists(tmp_path / checkpoint.CORRUPT_DIR)
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', original)  # storage is back
  assert int(checkpoint.restore_latest(checkpoint.checkpoint_manager(str(tmp_path)), tiny_state()).step) == 4


def test_a_transient_save_failure_is_storage_unavailable_not_a_user_error():
  manager = type('Manager', (), {'directory': 'gs://b/run/checkpoints'})()
  error = checkpoint.save_error(manager, RuntimeError('HTTP response code 503 when uploading gs://b/run/x'))
  assert isinstance(error, errors.StorageUnavailable) and 'gs://b/run/checkpoints' in str(error)
  full = checkpoint.save_error(manager, OSError(28, 'No space left on device'))
  assert isinstance(full, checkpoint.CheckpointSaveError)  # a full disk stays the user's to fix (exit 2)


def test_sampling_an_empty_workdir_leaves_no_folder_behind(tmp_path):
  workdir = tmp_path / 'empty'
  workdir.mkdir()
  with pytest.raises(errors.MissingInputError):
    checkpoint.load_params(str(workdir))
  assert os.listdir(workdir) == []


def test_an_unwritable_workdir_is_one_error_and_leaves_nothing(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(validation.WorkdirError):
    validation.check_workdir_writable(str(blocker / 'run'))
  assert os.listdir(tmp_path) == ['file']


def test_memory_mapped_inputs_must_be_local():
  from groupdiff_jax.data import latent_store  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError) as raised:
    latent_store.LatentStore('gs://bucket/latents')
  assert 'gs://bucket/latents' in str(raised.value) and 'gcloud storage' in str(raised.value)
  assert storage.path('rel/dir') == storage.path(os.path.abspath('rel/dir'))  # local paths: as before
  assert str(storage.path('gs://b/run') / 'checkpoints') == 'gs://b/run/checkpoints'
