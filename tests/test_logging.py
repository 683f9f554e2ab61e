"""Output: one progress reporter (progress.py), absl logging on process 0 by default, `print` for final output only."""

import ast
import io
import logging
import os

import pytest
from absl import logging as absl_logging

from groupdiff_jax import distributed
from groupdiff_jax.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (module, function) allowed to print: a command's final output (where its results went) and the one-line errors.
PRINTS_FINAL_OUTPUT = {
    ('groupdiff_jax/main.py', 'run'), ('groupdiff_jax/main.py', 'report_samples'),
    ('groupdiff_jax/errors.py', '_parse_flags'), ('groupdiff_jax/errors.py', 'guarded'),
    ('groupdiff_jax/train.py', 'train_and_evaluate'), ('groupdiff_jax/compile_job.py', 'run'),
    ('groupdiff_jax/convert.py', 'main'), ('groupdiff_jax/evaluation/evaluator.py', 'main'),
    ('groupdiff_jax/data/neighbors_job.py', 'run'), ('groupdiff_jax/data/extract_latents_job.py', 'run'),
    ('groupdiff_jax/data/extract_latents_job.py', 'main'), ('groupdiff_jax/data/embeddings_job.py', 'run'),
    ('groupdiff_jax/data/embeddings_job.py', 'main'),
}


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def progress_lines(caplog):
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith('sampling:')]


def test_off_a_terminal_progress_is_a_log_line_every_every_s_and_at_the_end(caplog):
  caplog.set_level(logging.INFO)
  clock = FakeClock()
  progress = Progress('sampling', 100, 'images', initial=20, every_s=30.0, show=True, stream=io.StringIO(),
                      clock=clock)
  clock.now = 10.0
  progress(30)  # before every_s: nothing
  assert progress_lines(caplog) == []
  clock.now = 40.0
  progress(60)  # 40 images of this run in 40 s: 1 image/s, 40 to go
  clock.now = 50.0
  progress(70)  # 10 s after the last line: nothing
  clock.now = 60.0
  progress(100)  # the end: always
  progress.close()
  first, last = progress_lines(caplog)
  assert first.startswith('sampling: 60.0% 60/100 images [00:40<00:40, ') and '1.00images/s' in first
  assert last.startswith('sampling: 100.0% 100/100 images [01:00<00:00, '), last


def test_progress_shows_a_bar_on_a_terminal_and_nothing_when_not_shown(caplog):
  caplog.set_level(logging.INFO)

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  terminal = Terminal()
  bar = Progress('sampling', 8, 'images', stream=terminal, show=True)
  for done in range(1, 9):
    bar(done)
  bar.close()
  assert '8/8' in terminal.getvalue() and progress_lines(caplog) == []  # the bar, no log lines
  quiet = Terminal()
  silent = Progress('sampling', 8, 'images', show=False, stream=quiet)
  silent(8, force=True)
  silent.close()
  assert quiet.getvalue() == '' and progress_lines(caplog) == []


def test_info_lines_only_on_process_zero_unless_marked_all_processes(caplog):
  caplog.set_level(logging.INFO)
  try:
    distributed.log_on_process_zero(1)
    absl_logging.info('an info line of process 1')
    absl_logging.info('a line every process logs', extra=distributed.ALL_PROCESSES)
    absl_logging.warning('a warning of process 1')
  finally:
    distributed.log_on_process_zero(0)
  absl_logging.info('an info line of process 0')
  messages = [r.getMessage() for r in caplog.records]
  assert messages == ['a line every process logs', 'a warning of process 1', 'an info line of process 0']
  assert distributed.process_index() == 0


def prints(path):
  """(function, line) of each print( call in the file; the function is the innermost def around it."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = []

  def walk(node, function):
    for child in ast.iter_child_nodes(node):
      name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
      if isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id == 'print':
        found.append((function, child.lineno))
      walk(child, name)
  walk(tree, None)
  return found


def test_library_code_prints_only_commands_final_output():
  offenders = []
  for directory, _, names in os.walk(os.path.join(ROOT, 'groupdiff_jax')):
    for name in sorted(n for n in names if n.endswith('.py')):
      path = os.path.join(directory, name)
      module = os.path.relpath(path, ROOT)
      offenders += [f'{module}:{line} in {function}()' for function, line in prints(path)
                    if (module, function) not in PRINTS_FINAL_OUTPUT]
  assert not offenders, 'Log these through absl.logging (progress: groupdiff_jax/progress.py):\n' + '\n'.join(offenders)


@pytest.mark.parametrize('module, function', sorted(PRINTS_FINAL_OUTPUT))
def test_every_allowed_printer_exists(module, function):  # the list stays exact
  assert function in {f for f, _ in prints(os.path.join(ROOT, module))}
