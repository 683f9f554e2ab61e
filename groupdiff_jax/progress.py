"""The one progress reporter of library loops: training steps, sampled images, data-job rows, Inception features.

tqdm measures and formats it (count, percentage, rate, elapsed, ETA). On a
terminal it is tqdm's live bar on stderr; elsewhere (a log file: Slurm, a
TPU pod, a test) it is one absl INFO line at most every `every_s` seconds
and one at the end, so that logs stay line by line. Process 0 reports
(distributed.process_index(), which starts no backend) unless the caller
says otherwise with `show`. Messages other than progress go through absl
logging directly.
"""

import sys
import time

from absl import logging
from tqdm import tqdm

from groupdiff_jax import distributed

LOG_FORMAT = '{desc}: {percentage:.1f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]'


def is_terminal(stream):
  return bool(getattr(stream, 'isatty', lambda: False)())


class Progress:
  """Call with the count done so far (`progress(done)`); `close()` at the end.

  what: what is counted ('sampling', 'latents'...); total: the count at
  the end; unit: 'rows', 'images', 'steps'; initial: the count already
  done before this run (resumed jobs: the rate counts only this run's);
  every_s: seconds between log lines off a terminal; show: report at all
  (default: on process 0); stream: where the bar goes (default stderr);
  clock: seconds, for the log lines' pacing (tests pass a fake one).
  """

  def __init__(self, what, total, unit='rows', initial=0, every_s=30.0, show=None, stream=None, clock=time.monotonic):
    self.what, self.total, self.unit, self.initial, self.every_s, self.clock = what, total, unit, initial, every_s, clock
    self.show = distributed.process_index() == 0 if show is None else show
    stream = sys.stderr if stream is None else stream
    self.done, self.postfix = initial, {}
    self.start = self.last = clock()
    self.bar = None
    if self.show and is_terminal(stream):
      self.bar = tqdm(total=total, initial=initial, desc=what, unit=unit, file=stream, dynamic_ncols=True)

  def __call__(self, done, total=None, force=False):
    """Report `done` of `total` (default: the total given first); `force` logs now whatever the pacing."""
    if total is not None:
      self.total = total
      if self.bar is not None:
        self.bar.total = total
    self.done = done
    if self.bar is not None:
      self.bar.update(done - self.bar.n)
      return
    now = self.clock()
    if self.show and (force or done >= self.total or now - self.last >= self.every_s):
      self.last = now
      logging.info('%s', self.line(now))

  def set_postfix(self, **values):
    """Values shown after the rate (e.g. the loss), as tqdm's postfix."""
    self.postfix = values
    if self.bar is not None:
      self.bar.set_postfix(values, refresh=False)

  def line(self, now=None):
    """The progress as one line, e.g. 'sampling: 40.0% 400/1000 images [00:10<00:15, 40.00images/s]'."""
    elapsed = (self.clock() if now is None else now) - self.start
    postfix = ', '.join(f'{k}={v}' for k, v in self.postfix.items())
    return tqdm.format_meter(self.done, self.total, elapsed, prefix=self.what, unit=self.unit, initial=self.initial,
                             bar_format=LOG_FORMAT, postfix=postfix or None)

  def close(self):
    if self.bar is not None:
      self.bar.close()
