"""`python -m groupdiff_jax.main` for the cloud-storage tests, with two test hooks set by the environment.

- Storage backoff waits are printed (`storage wait <seconds>`) instead of slept (groupdiff_jax.storage.sleep
  is injectable): no wall-clock time in the tests.
- STOP_EMULATOR_PID with STOP_EMULATOR_AT=restore (the first checkpoint restore) or save:<step> (the save of
  that step): kills the emulator (SIGKILL, by its PID) right before that call, a storage outage at a known
  point of the run.
"""

import os
import signal
import sys

sys.path.insert(0, os.getcwd())

import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top,wrong-import-position

from groupdiff_jax import errors, main, storage  # pylint: disable=wrong-import-position

storage.sleep = lambda seconds: print(f'storage wait {seconds}', file=sys.stderr, flush=True)

_PID, _AT = int(os.environ.get('STOP_EMULATOR_PID', '0')), os.environ.get('STOP_EMULATOR_AT', '')


def _stop_emulator():
  global _PID
  if _PID:
    os.kill(_PID, signal.SIGKILL)
    print(f'emulator {_PID} stopped', file=sys.stderr, flush=True)
    _PID = 0


def _wrap(name, when):
  original = getattr(ocp.CheckpointManager, name)

  def call(self, step, *args, **kwargs):
    if when(step):
      _stop_emulator()
    return original(self, step, *args, **kwargs)
  setattr(ocp.CheckpointManager, name, call)


if _AT == 'restore':
  _wrap('restore', lambda step: True)
elif _AT.startswith('save:'):
  _wrap('save', lambda step: step == int(_AT.split(':')[1]))

if __name__ == '__main__':
  errors.run_main(main.main)
