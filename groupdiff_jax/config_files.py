"""Config files given by path: `--config=configs/digits.py` and `--config.<field>=<value>` overrides.

ml_collections' `config_flags` loads the file and applies the overrides;
this module checks what a user can get wrong before it runs, so that each
mistake is one message (errors.ConfigError, exit 2) rather than the
loader's chained tracebacks:
- the file does not exist, or defines no `get_config` (the message names
  the path and lists the shipped configs);
- an override names a field the config does not have (the message names
  the nearest fields);
- the config lacks fields of configs/default.py or has fields it does not
  define (the library reads every field directly and nothing else: a
  config starts from `default.get_config()` and changes values).
An exception raised by the code inside a config file (a KeyError
included) is that code's bug and keeps its traceback.

The shipped configs build on each other (`from configs import default`),
and a config file of one's own, anywhere, can start from them the same way
(`from configs import digits`): `make_shipped_configs_importable` binds the
package name `configs` to this repository's configs/ folder, whatever the
working directory.
"""

import difflib
import importlib.util
import os
import re
import sys

import ml_collections

from groupdiff_jax import errors

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), 'configs')
_OVERRIDE = re.compile(r'^--?(?:no)?config\.([^=]+)')


def shipped_configs():
  """The config files in configs/ (names of the files with a get_config, e.g. 'digits.py'); [] without a
  source checkout."""
  if not os.path.isdir(CONFIGS_DIR):
    return []
  names = sorted(name for name in os.listdir(CONFIGS_DIR) if name.endswith('.py'))
  return [name for name in names if 'def get_config(' in _read(os.path.join(CONFIGS_DIR, name))]


def _read(path):
  with open(path) as f:
    return f.read()


def make_shipped_configs_importable():
  """`import configs` (and `from configs import default`) means this repository's configs/ folder.

  Without it, the name resolves only when the working directory is the
  repository root. A `configs` module already imported from that folder is
  kept; without a source checkout (no configs/ folder) nothing changes.
  """
  init = os.path.join(CONFIGS_DIR, '__init__.py')
  loaded = sys.modules.get('configs')
  if not os.path.isfile(init) or (loaded is not None and
                                  os.path.realpath(getattr(loaded, '__file__', '') or '') == init):
    return
  spec = importlib.util.spec_from_file_location('configs', init, submodule_search_locations=[CONFIGS_DIR])
  module = importlib.util.module_from_spec(spec)
  sys.modules['configs'] = module
  spec.loader.exec_module(module)


def config_argument(argv):
  """The value of `--config` in argv (`--config=PATH` or `--config PATH`), or None."""
  for i, arg in enumerate(argv):
    if re.match(r'^--?config=', arg):
      return arg.split('=', 1)[1]
    if re.match(r'^--?config$', arg) and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load(argument):
  """The ConfigDict of a `--config` argument (`path.py` or `path.py:arg`); a missing file, a file without
  `get_config` or one that returns no ConfigDict raises errors.ConfigError naming the path."""
  path, *args = argument.split(':', 1)
  if not os.path.isfile(path):
    raise errors.ConfigError(f'--config={argument}: no such file (from {os.getcwd()}). {_listing(path)}')
  make_shipped_configs_importable()
  spec = importlib.util.spec_from_file_location('groupdiff_jax_user_config', path)
  if spec is None:
    raise errors.ConfigError(f'--config={argument}: not a Python file; a config is a .py file that defines '
                             f'get_config(). {_listing(path)}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # an exception here is the config code's own: it keeps its traceback
  if not callable(getattr(module, 'get_config', None)):
    raise errors.ConfigError(f'--config={argument}: {path} defines no get_config() (a config file returns its '
                             f'ml_collections.ConfigDict from get_config()). {_listing(path)}')
  config = module.get_config(*args)
  if not isinstance(config, ml_collections.ConfigDict):
    raise errors.ConfigError(f'--config={argument}: get_config() returned {type(config).__name__}, not an '
                             f'ml_collections.ConfigDict.')
  check_fields(config, argument)
  return config


def field_names(config):
  """{'train.batch_size', ...}: the dotted names of a ConfigDict's fields."""
  names = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      names |= {f'{key}.{name}' for name in field_names(value)}
    else:
      names.add(key)
  return names


def check_fields(config, argument):
  """ConfigError when `config` lacks fields of configs/default.py or has others (nothing without a checkout)."""
  if not os.path.isfile(os.path.join(CONFIGS_DIR, 'default.py')):
    return
  make_shipped_configs_importable()
  from configs import default  # pylint: disable=g-import-not-at-top
  expected, found = field_names(default.get_config()), field_names(config)
  missing, unknown = sorted(expected - found), sorted(found - expected)
  problems = ([f'lacks {", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}'] if missing else []) + (
      [f'has {", ".join(unknown[:8])}{" ..." if len(unknown) > 8 else ""}, which configs/default.py does not define '
       '(nothing reads them)'] if unknown else [])
  if problems:
    raise errors.ConfigError(f'--config={argument}: the config ' + ' and '.join(problems) + '. Start from '
                             '`from configs import default` (`config = default.get_config()`) and change values; '
                             'a new field gets its default in configs/default.py.')


def _listing(path):
  """'The shipped configs in DIR: a.py, b.py; did you mean X?' for a message about `path`."""
  names = shipped_configs()
  if not names:
    return 'Give the path of a config file (see configs/ in the repository).'
  close = difflib.get_close_matches(os.path.basename(path), names, n=1)
  guess = f'; did you mean {os.path.join(CONFIGS_DIR, close[0])}?' if close else '.'
  return f'The shipped configs, in {CONFIGS_DIR}: {", ".join(names)}{guess}'


def check_overrides(config, argv):
  """Each `--config.<field>=...` in argv names a field of `config`; else errors.ConfigError with the nearest."""
  for arg in argv[1:]:
    match = _OVERRIDE.match(arg)
    if match:
      _check_field(config, match.group(1), arg)


def _check_field(config, field, arg):
  node, walked = config, []
  for part in field.split('.'):
    key = re.sub(r'\[.*$', '', part)  # `field[0]`: an element of a tuple field
    if not isinstance(node, ml_collections.ConfigDict):
      return  # below a leaf (a tuple element...): ml_collections checks the rest
    if key not in node:
      prefix = '.'.join(walked + [''])
      close = difflib.get_close_matches(key, list(node.keys()), n=3, cutoff=0.7)
      nearest = f'did you mean {" or ".join(prefix + name for name in close)}? ' if close else ''
      where = f'config.{".".join(walked)}' if walked else 'the config'
      raise errors.ConfigError(f'{arg}: {where} has no field {key!r}; {nearest}configs/default.py lists every '
                               f'field with its meaning.')
    node = node[key]
    walked.append(key)


def check_argv(argv):
  """Before the flags are parsed: the config file loads and every override names one of its fields."""
  argument = config_argument(argv)
  if argument is None:
    return  # absl reports the missing required flag
  check_overrides(load(argument), argv)
