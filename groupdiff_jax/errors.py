"""User-facing errors and the process exit codes of `groupdiff_jax.main`.

A *user's* mistake (a config value, a data file, a weights file, the
workdir) raises one of the `UserError` family with a message that names
the value or file and says what to do; `main` prints that message alone
and exits with `EXIT_USER_ERROR`, without a traceback. Anything else is a
bug and keeps its traceback.

The subclasses also derive from the built-in type the error used to be, so
`except ValueError` / `except FileNotFoundError` callers keep working.
"""

import json

EXIT_OK = 0  # finished: training reached train.num_steps, or the job is complete
EXIT_USER_ERROR = 2  # bad input (config, data, weights, workdir): fix what the message names
# Preempted (SIGTERM / maintenance event): the checkpoint at the current step
# is saved; rerun the same command to resume. 75 is sysexits.h's EX_TEMPFAIL
# ("temporary failure, the user is invited to retry"); launch/ requeues on it.
EXIT_PREEMPTED = 75
# Interrupted (Ctrl-C, SIGINT): 128 + SIGINT, as a shell reports it. In training the first Ctrl-C saves a
# checkpoint at the step reached (rerun to resume), a second one stops at once (preemption.Interrupts).
EXIT_INTERRUPTED = 130
# Any other status (1, with a traceback) is a bug: please report it.


class StorageUnavailable(Exception):
  """Storage (a bucket, a network disk) stayed unreachable through the retries: not the user's mistake and not
  corruption; `run_main` exits EXIT_PREEMPTED so that the launchers requeue the run."""


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


def read_json_object(path, error, what_to_do):
  """The JSON object (dict) in `path`; an unreadable file or another JSON type raises `error` naming the file
  and ending in `what_to_do`."""
  try:
    from etils import epath  # pylint: disable=g-import-not-at-top
    value = json.loads(epath.Path(path).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f'{path}: not a readable JSON file ({e}); {what_to_do}') from e
  if not isinstance(value, dict):
    raise error(f'{path}: holds a JSON {type(value).__name__}, not an object; {what_to_do}')
  return value


def _parse_flags(argv, check_argv=None):
  """absl's flag parsing: a bad flag, or what `check_argv(argv)` raises as a UserError, is one message and exit 2;
  `--help` (or `--helpfull`) prints the usage and exits 0."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  names = {arg.split('=', 1)[0].lstrip('-') for arg in argv[1:] if arg.startswith('-')}
  if names & {'help', 'helpshort', '?', 'helpfull'}:
    app.usage(shorthelp='helpfull' not in names, writeto_stdout=True)
    sys.exit(EXIT_OK)
  try:
    if check_argv is not None:
      check_argv(argv)
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f'Error: {error}\nPass --helpfull to see the flags.', file=sys.stderr)
  except UserError as error:
    print(f'Error: {error}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def run_main(main, argv=None, check_argv=None):
  """`absl.app.run(main)` for a command-line entry point: a UserError is one message and exit 2, storage that
  stayed unreachable (StorageUnavailable) one message and exit 75.

  Flag errors (a value of the wrong type, a missing required flag, what
  `check_argv(argv)` raises before the flags are parsed: e.g. an unknown
  `--config.<field>`) end the same way, before `main` runs. Any other
  exception keeps its traceback. `argv` defaults to sys.argv.
  """
  import logging  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top

  def guarded(argv):
    try:
      return main(argv)
    except (UserError, StorageUnavailable) as error:
      for handler in logging.getLogger().handlers:
        handler.flush()  # the log so far, then the message last (shutdown would close the handlers' streams)
      print(f'Error: {error}', file=sys.stderr)
      sys.exit(EXIT_PREEMPTED if isinstance(error, StorageUnavailable) else EXIT_USER_ERROR)

  app.run(guarded, argv=argv, flags_parser=lambda argv: _parse_flags(argv, check_argv))
