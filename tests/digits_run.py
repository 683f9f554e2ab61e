"""The digits demo shrunk for tests, run through its command line: in a subprocess or in this process.

`trained_digits_run` (conftest.py) trains it once per pytest run for every
test that needs "a trained run" (its outputs, sampling from it, resuming it).
"""

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Depth 1, width 32, 16 images in mixed steps (one step kind: one compilation), 2 groups of 2 Heun steps.
TINY = ('--config.model.depth=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
        '--config.train.batch_size=16', '--config.train.mixed_steps=True', '--config.train.log_every=2',
        '--config.train.checkpoint_every=2', '--config.sample.num_steps=2', '--config.sample.num_groups=2')
TRAINED_STEPS = 4


def command(workdir, *flags):
  """`python -m groupdiff_jax.main` of the tiny digits config (this interpreter)."""
  return [sys.executable, '-m', 'groupdiff_jax.main', '--config=configs/digits.py', f'--workdir={workdir}', *TINY,
          *flags]


def run_in_process(workdir, *flags, config='configs/digits.py'):
  """main's exit code for these flags, run as `python -m groupdiff_jax.main` would, in this process
  (tests/cli_in_process.py); its output stays in pytest's capture."""
  from tests import cli_in_process
  return cli_in_process.exit_code(f'--config={os.path.join(ROOT, config)}', f'--workdir={workdir}', *flags)


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A finished `command(workdir, --config.train.num_steps=TRAINED_STEPS)`: its workdir (shared: read it or
  `copy` it, never write into it) and what it printed."""
  workdir: pathlib.Path
  returncode: int
  stdout: str
  stderr: str

  def copy(self, destination):
    """A private copy of the workdir to resume or sample into; its path as a string."""
    shutil.copytree(self.workdir, destination)
    return str(destination)


def train_once(directory):
  """Train into directory/run unless a finished run is there already (the caller holds a lock)."""
  directory = pathlib.Path(directory)
  workdir, done = directory / 'run', directory / 'result.txt'
  if not done.exists():
    shutil.rmtree(workdir, ignore_errors=True)
    result = subprocess.run(command(workdir, f'--config.train.num_steps={TRAINED_STEPS}'), cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    (directory / 'stdout.txt').write_text(result.stdout)
    (directory / 'stderr.txt').write_text(result.stderr)
    done.write_text(str(result.returncode))
  return TrainedRun(workdir, int(done.read_text()), (directory / 'stdout.txt').read_text(),
                    (directory / 'stderr.txt').read_text())
