"""When to stop for a preemption (SIGTERM, or the cluster's preemption notice) or a Ctrl-C (SIGINT).

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

Ctrl-C (`Interrupts`, installed by main.py for the whole command): inside
the training loop, once its first step is compiled, the first SIGINT is
handled like SIGTERM (save at the step reached, exit 130; with several
processes it is passed on as SIGTERM to this process's coordination
service, so that every host stops at one step); a second SIGINT, or one
anywhere else (data setup, compilation, sampling), stops the process at
once with one line and exit 130, never a KeyboardInterrupt.
"""

import os
import select
import signal
import sys
import threading

import jax
from absl import logging

from groupdiff_jax import errors

_active = None  # the installed Interrupts (signal handlers are per process)


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
    if _active is not None:
      _active.disarm(self)
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame):
    del frame
    self.signal_received = signal.Signals(signum).name
    logging.warning('%s received: saving a checkpoint after the current step, then exiting.', self.signal_received)

  def arm_interrupts(self):
    """From now on (a step is compiled and running) a first Ctrl-C saves at the step reached, if Interrupts is
    installed; before, it stops the process at once."""
    if _active is not None:
      _active.arm(self)

  def interrupt(self):
    """A first Ctrl-C while armed: stop after the current step, as for SIGTERM."""
    if self.signal_received is not None:
      return
    logging.warning('SIGINT (Ctrl-C): saving a checkpoint after the current step, then exiting (Ctrl-C again '
                    'stops at once, without saving).')
    self.signal_received = 'SIGINT'
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)  # the coordination service's notice: every host agrees on a step

  def stop_at(self, step):
    """True when the run must stop after `step` (the same step on every host)."""
    if jax.process_count() > 1:
      return self.manager.reached_preemption(step)
    return self.signal_received is not None


class Interrupts:
  """Ctrl-C for a command: one line and exit 130 (errors.EXIT_INTERRUPTED) instead of a KeyboardInterrupt.

  A context manager (main thread only; elsewhere it does nothing). Outside
  an armed PreemptionWatch a SIGINT ends the process at once; inside, the
  first one asks the loop to save and return (`requested` becomes True),
  the next ones end the process at once.

  Python runs a signal handler only when the main thread executes
  bytecode, so a SIGINT during an XLA compile or a blocking device call
  would wait for it (and a KeyboardInterrupt raised there may leave the
  runtime's threads mid-flight). So the C-level handler's wakeup byte
  (`signal.set_wakeup_fd`) is also read by a thread that acts while the
  main thread is in native code. Each SIGINT's byte is consumed once, under
  a lock, by whichever comes first: the thread or the Python-level handler
  (which therefore has acted when `signal.raise_signal` returns). Exiting
  at once is `os._exit`: nothing is raised into running code.
  """

  def __init__(self):
    self.requested = False
    self._lock = threading.RLock()  # RLock: the Python-level handler may run while the main thread holds it
    self._watch = None
    self._installed = False
    self._count = 0

  def __enter__(self):
    global _active
    if threading.current_thread() is not threading.main_thread():
      return self
    self._read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._read_fd, False)
    os.set_blocking(self._write_fd, False)
    self._previous_handler = signal.signal(signal.SIGINT, self._on_handler)
    self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
    threading.Thread(target=self._watch_wakeup, name='sigint-watch', daemon=True).start()
    self._installed, _active = True, self
    return self

  def __exit__(self, *exc):
    global _active
    if not self._installed:
      return
    signal.set_wakeup_fd(self._previous_wakeup)
    signal.signal(signal.SIGINT, self._previous_handler)
    os.close(self._write_fd)  # the watcher reads end-of-file, closes the read end and ends
    self._installed, _active = False, None

  def arm(self, watch):
    with self._lock:
      self._watch = watch

  def disarm(self, watch):
    with self._lock:
      if self._watch is watch:
        self._watch = None

  def _on_handler(self, signum, frame):
    del signum, frame
    self._consume()

  def _watch_wakeup(self):
    while True:
      select.select([self._read_fd], [], [])
      if not self._consume():
        os.close(self._read_fd)
        return

  def _consume(self):
    """Acts on the SIGINTs among the wakeup bytes waiting; False at end of file (uninstalled)."""
    with self._lock:
      try:
        data = os.read(self._read_fd, 512)
      except BlockingIOError:  # taken by the other reader
        return True
      for byte in data:
        if byte == signal.SIGINT:
          self._count += 1
          self._on_sigint()
      return bool(data)

  def _on_sigint(self):
    if self._watch is None or self._count > 1:
      detail = ' (the step in flight is not saved)' if self.requested else ''
      _exit_at_once(f'Interrupted (SIGINT): stopped at once{detail}; rerun the same command to continue from '
                    f'what is saved.')
    self.requested = True
    self._watch.interrupt()


def _exit_at_once(line):
  """Writes `line` to stderr and ends the process with errors.EXIT_INTERRUPTED, without unwinding it."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError, RuntimeError):  # closed, or a write of this thread in flight
      pass
  os.write(2, f'{chr(10) if sys.stderr.isatty() else ""}{line}\n'.encode())  # after a progress bar: own line
  os._exit(errors.EXIT_INTERRUPTED)  # pylint: disable=protected-access
