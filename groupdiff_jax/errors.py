"""User-facing errors and the process exit codes of `groupdiff_jax.main`.

A *user's* mistake (a config value, a data file, a weights file, the
workdir) raises one of the `UserError` family with a message that names
the value or file and says what to do; `main` prints that message alone
and exits with `EXIT_USER_ERROR`, without a traceback. Anything else is a
bug and keeps its traceback.

The subclasses also derive from the built-in type the error used to be, so
`except ValueError` / `except FileNotFoundError` callers keep working.
"""

EXIT_OK = 0  # finished: training reached train.num_steps, or the job is complete
EXIT_USER_ERROR = 2  # bad input (config, data, weights, workdir): fix what the message names
# Preempted (SIGTERM / maintenance event): the checkpoint at the current step
# is saved; rerun the same command to resume. 75 is sysexits.h's EX_TEMPFAIL
# ("temporary failure, the user is invited to retry"); launch/ requeues on it.
EXIT_PREEMPTED = 75


class UserError(Exception):
  """A mistake in what the user gave us; the message is the whole report."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (names the field and a value that would)."""


class DataError(UserError, ValueError):
  """Data on disk that is malformed or inconsistent (names the file)."""


class MissingInputError(UserError, FileNotFoundError):
  """A file or directory the run needs does not exist (names it and how to make it)."""


class WeightsError(UserError, ValueError):
  """A checkpoint or weights file that does not match, is corrupt or unreadable."""
