"""`python -m groupdiff_jax.main ARGS` run inside the test process, for what needs no fresh process.

A command that stops before its work (a user's mistake, --help) costs a
few milliseconds here instead of a Python and JAX start-up (6-8 s). The
absl flags are global: each call starts from unparsed flags, without the
`--config.<field>` flags that ml_collections defined for the previous one.
"""

import logging
import sys

import pytest
from absl import flags

from groupdiff_jax import main


def exit_code(*args):
  """Exit code of the command line `groupdiff_jax.main *args` (its output stays in pytest's capture)."""
  argv = ['groupdiff_jax.main', *args]
  saved_argv, root_level = sys.argv, logging.getLogger().level
  sys.argv = argv  # ml_collections reads the --config.<field> overrides from sys.argv
  for name in [name for name in flags.FLAGS if name.startswith('config.')]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  try:
    with pytest.raises(SystemExit) as exit_info:
      main.cli(argv)
  finally:
    sys.argv = saved_argv
    logging.getLogger().setLevel(root_level)
  return exit_info.value.code or 0


def run_main(capsys, *args):
  """(exit code, stdout, stderr) of the command line `groupdiff_jax.main *args`."""
  code = exit_code(*args)
  captured = capsys.readouterr()
  return code, captured.out, captured.err
