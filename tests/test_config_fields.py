"""Config fields are read directly (`config.train.batch_size`); their defaults live only in configs/default.py.

A `config.get('field', default)` repeats a default of configs/default.py and
silently ignores a renamed or misspelled field; read directly, a missing field
is an AttributeError (or KeyError) that the tests find.

The rule checked over the code in groupdiff_jax/ and experiments/: no `.get(`
and no three-argument `getattr(` on a config object, where a config object is
a name `config`, `cfg` or `*_config` (a parameter or a variable), an attribute
or item of one (`config.model`, `config['mesh']`), or a local name assigned
from one (`m = config.model`). Dicts read from JSON files or returned by
functions keep `.get`.
"""

import ast
import os

import pytest

from configs import default
from groupdiff_jax import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKED_FOLDERS = ('groupdiff_jax', 'experiments')


def is_config_name(name):
  return name in ('config', 'cfg') or name.endswith('_config')


def root_name(node):
  """'config' for config.model.x, config['mesh'] and config; None for anything else (a call, a literal...)."""
  while isinstance(node, (ast.Attribute, ast.Subscript)):
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


def config_aliases(function):
  """Names a function binds to a config object: config-named parameters, and locals assigned from a config."""
  args = function.args
  names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if is_config_name(a.arg)}
  changed = True
  while changed:  # `m = config.model` then `s = m.sample`: follow the chain
    changed = False
    for node in ast.walk(function):
      if isinstance(node, ast.Assign) and len(node.targets) == 1:
        pairs = [(node.targets[0], node.value)]
        if isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple):
          pairs = list(zip(node.targets[0].elts, node.value.elts))  # `cc, remat = config.compile, ...`
        for target, value in pairs:
          source = root_name(value) if isinstance(value, (ast.Name, ast.Attribute, ast.Subscript)) else None
          if (isinstance(target, ast.Name) and target.id not in names and source is not None and
              (is_config_name(source) or source in names)):
            names.add(target.id)
            changed = True
  return names


def defaulted_reads(source, filename):
  """(line, text) of each `.get(` / three-argument `getattr(` on a config object in `source`."""
  tree = ast.parse(source, filename)
  found = []

  def check(scope_names, node):
    if not isinstance(node, ast.Call):
      return
    func = node.func
    receiver = None
    if isinstance(func, ast.Attribute) and func.attr == 'get':
      receiver = func.value
    elif isinstance(func, ast.Name) and func.id == 'getattr' and len(node.args) == 3:
      receiver = node.args[0]
    if receiver is None:
      return
    name = root_name(receiver)
    if name is not None and (is_config_name(name) or name in scope_names):
      found.append((node.lineno, ast.get_source_segment(source, node)))

  functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
  for function in functions:
    names = config_aliases(function) if not isinstance(function, ast.Lambda) else set()
    for node in ast.walk(function):
      check(names, node)
  for node in ast.walk(tree):  # module level
    check(set(), node)
  return sorted(set(found))


def python_files():
  for folder in CHECKED_FOLDERS:
    for directory, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in sorted(names):
        if name.endswith('.py'):
          yield os.path.join(directory, name)


def test_the_rule_finds_defaulted_reads_of_config_objects():
  source = '''
def f(config, model_config, payload):
  a = config.train.get('batch_size', 256)
  m = config.model
  s = m
  b = s.get('objective', 'sit')
  c = model_config.get('path')
  d = getattr(config.sample, 'cfg_scale', 1.5)
  e = payload.get('recall')  # a JSON dict: allowed
  g = getattr(payload, 'x', None)
  return config.train.batch_size  # read directly: allowed
'''
  assert [line for line, _ in defaulted_reads(source, 'example.py')] == [3, 6, 7, 8]


def test_library_and_experiment_code_reads_config_fields_directly():
  offenders = []
  for path in python_files():
    with open(path) as f:
      source = f.read()
    offenders += [f'{os.path.relpath(path, ROOT)}:{line}: {text}' for line, text in defaulted_reads(source, path)]
  assert not offenders, ('Read these config fields directly (a missing field is then an error the tests find) and '
                         'give any new field its default in configs/default.py:\n' + '\n'.join(offenders))


@pytest.mark.parametrize('name', config_files.shipped_configs())
def test_every_shipped_config_has_exactly_the_fields_of_default(name):
  # A field that only some configs define would have its default elsewhere (or none): a config changes values.
  config = config_files.load(os.path.join(config_files.CONFIGS_DIR, name))  # check_fields: the same, as one error
  assert config_files.field_names(config) == config_files.field_names(default.get_config())
