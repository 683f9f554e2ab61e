"""What the processes of one sweep share on disk: file locks, and the log of their invocations."""

import contextlib
import fcntl


@contextlib.contextmanager
def _lock(path, wait):
  """Yields True while this process holds <path>.lock; with wait=False, False at once where another does."""
  with open(path + '.lock', 'w') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def exclusive(path):
  """Holds an exclusive lock on <path>.lock, waiting for it: two invocations on one folder never build the same
  piece twice; the second waits and then loads it."""
  return _lock(path, wait=True)


def claim(path):
  """Yields True while this process holds <path>.lock, False (at once, without waiting) where another does:
  processes started side by side on one folder split the runs between them instead of running one twice."""
  return _lock(path, wait=False)


def merge_invocation(invocations, invocation):
  """The log with this invocation's entry (by its 'id') replaced or added, oldest first.

  Callers re-read the log under exclusive() before merging: processes running side by side each keep their
  own entry (a list read once at start would drop the others').
  """
  others = [e for e in invocations if e.get('id') != invocation['id']]
  return sorted(others + [invocation], key=lambda e: e['started_utc'])
