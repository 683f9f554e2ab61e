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


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag or unknown `--config.<key>` as one message and exit 2."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f'Error: {error}\nPass --helpfull to see the flags.', file=sys.stderr)
  except (AttributeError, KeyError) as error:
    # ml_collections' config_flags: an override of a field the config does not have.
    key = str(error).strip('"\'')
    overrides = [a for a in argv[1:] if a.startswith('--config.') and key in a.split('=', 1)[0].split('.')]
    where = ' '.join(overrides) or 'a --config.<field> override'
    print(f'Error: the config has no field {key!r} ({where}); check the spelling against the config file '
          f'(configs/default.py lists every field).', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def run_main(main):
  """`absl.app.run(main)` for a command-line entry point: a UserError is one message and exit 2, storage that
  stayed unreachable (StorageUnavailable) one message and exit 75.

  Flag errors (an unknown `--config.<key>`, a value of the wrong type, a
  missing required flag) end the same way, before `main` runs. Any other
  exception keeps its traceback.
  """
  import logging  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top

  def guarded(argv):
    try:
      return main(argv)
    except UserError as error:
      logging.shutdown()
      print(f'Error: {error}', file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    except StorageUnavailable as error:
      logging.shutdown()
      print(f'Error: {error}', file=sys.stderr)
      sys.exit(EXIT_PREEMPTED)

  app.run(guarded, flags_parser=_parse_flags)
