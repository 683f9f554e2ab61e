"""When to stop for a preemption: SIGTERM, or the cluster's preemption notice.

One process: a SIGTERM (what Slurm, Kubernetes and GPU schedulers send
before killing a job) sets a flag; the loop checks it after each step,
saves a checkpoint at that step and returns.

Several processes: every host must stop at the *same* step, or their
checkpoints would disagree. JAX's coordination service (started by
`jax.distributed.initialize`) receives the notice (SIGTERM, or the TPU
maintenance event) and `multihost_utils.reached_preemption_sync_point(step)`
(what orbax's `manager.reached_preemption(step)` calls) returns True on
every host at one agreed step. No Python handler is installed there: it
would replace the coordination service's own SIGTERM handler.
"""

import logging
import signal

import jax


class PreemptionWatch:
  """`stop_at(step)` is True once the run should save and exit.

  Use as a context manager: the SIGTERM handler (one process only) is
  installed on entry and the previous one restored on exit.
  """

  def __init__(self, manager):
    self.manager = manager
    self.signal_received = None
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
      except ValueError:  # not the main thread: no handler, SIGTERM keeps its default
        logging.warning('Not in the main thread: SIGTERM will kill training without a checkpoint.')
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame):
    del frame
    self.signal_received = signal.Signals(signum).name
    logging.warning('%s received: saving a checkpoint after the current step, then exiting.', self.signal_received)

  def stop_at(self, step):
    """True when the run must stop after `step` (the same step on every host)."""
    if jax.process_count() > 1:
      return self.manager.reached_preemption(step)
    return self.signal_received is not None
