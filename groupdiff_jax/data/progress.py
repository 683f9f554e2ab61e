"""Progress lines with rate and ETA for the data jobs (printed, at most every `every_s` seconds)."""

import sys
import time


class Progress:
  """Call with the number done so far; prints `what: done/total (pct) rate/s, ETA h:mm:ss`."""

  def __init__(self, what, total, unit='rows', every_s=10.0, start_done=0, stream=None):
    self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
    self.start_done, self.start = start_done, time.time()
    self.last_print = 0.0
    self.stream = stream or sys.stdout

  def __call__(self, done, total=None, force=False):
    total = self.total if total is None else total
    now = time.time()
    if not force and now - self.last_print < self.every_s and done < total:
      return
    self.last_print = now
    rate = (done - self.start_done) / max(now - self.start, 1e-9)
    eta = (total - done) / rate if rate > 0 else float('inf')
    eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if eta != float('inf') else '?'
    print(f'{self.what}: {done:,}/{total:,} {self.unit} ({100 * done / max(total, 1):.1f}%), '
          f'{rate:,.0f} {self.unit}/s, ETA {eta_text}', file=self.stream, flush=True)
