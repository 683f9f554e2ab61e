"""Data flows one way: library modules never import a job (a CLI); every folder says what it holds."""

import ast
import pathlib

import groupdiff_jax

PACKAGE = pathlib.Path(groupdiff_jax.__file__).parent
# The jobs: thin CLIs over the library (README, "Layout"). main.py dispatches to them.
JOBS = {'groupdiff_jax.main', 'groupdiff_jax.train', 'groupdiff_jax.sample_job', 'groupdiff_jax.compile_job',
        'groupdiff_jax.convert'}


def module_name(path):
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def is_job(name):
  return name in JOBS or (name.startswith('groupdiff_jax.data.') and name.endswith('_job'))


def imported_modules(path):
  """Every groupdiff_jax module `path` imports, at top level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.add(node.module)
      found.update(f'{node.module}.{alias.name}' for alias in node.names)  # `from pkg import module`
  return {name for name in found if name.startswith('groupdiff_jax')}


def modules():
  return {module_name(path): path for path in PACKAGE.rglob('*.py')}


def test_the_walk_sees_the_jobs_imports():
  # The test's own premise: main imports the jobs, so the walk would see a library doing the same.
  imports = imported_modules(modules()['groupdiff_jax.main'])
  assert {'groupdiff_jax.train', 'groupdiff_jax.sample_job'} <= imports
  assert all(name in modules() for name in JOBS) and any(is_job(name) for name in modules() if '.data.' in name)


def test_no_library_module_imports_a_job():
  crossing = {name: sorted(filter(is_job, imported_modules(path))) for name, path in modules().items()
              if not is_job(name)}
  assert {name: jobs for name, jobs in crossing.items() if jobs} == {}


def test_every_folder_says_what_it_holds():
  for init in PACKAGE.rglob('__init__.py'):
    docstring = ast.get_docstring(ast.parse(init.read_text()))
    assert docstring and len(docstring.split()) >= 5, f'{init} has no docstring saying what the folder is'


def test_jobs_do_not_import_each_other_only_main_dispatches():
  crossing = {name: sorted(job for job in imported_modules(path) if is_job(job) and job != name)
              for name, path in modules().items() if is_job(name) and name != 'groupdiff_jax.main'}
  assert {name: jobs for name, jobs in crossing.items() if jobs} == {}


def test_no_file_of_the_package_is_over_450_lines():
  lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob('*.py')}
  assert {name: n for name, n in lengths.items() if n > 450} == {}
