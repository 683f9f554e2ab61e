"""Entry point: `python -m groupdiff_jax.main --config=configs/<name>.py --workdir=DIR`.

Only flags and dispatch live here; the logic is in importable modules
(train.py, sample_job.py, describe.py) so that tests drive it directly.

Modes:
  train         train (resuming from the workdir's latest checkpoint), then
                sample when the data are images (the demo's samples.png)
  sample        the sample job from the workdir's latest checkpoint:
                sample.num_groups groups in chunks over all hosts and devices,
                resumable, into <workdir>/samples/ (samples_*.npz for the
                evaluator, samples.png, sample_settings.json; sample_job.py)
  eval          the ADM evaluator (FID, sFID, IS, precision, recall) on
                <workdir>/samples/samples_*.npz against config.eval
                .reference_batch with config.eval.inception_graph
  describe      print parameters, FLOPs per step, mesh, batch and memory per
                device for the config, without training (describe.py)
  compile       compile the train step of every step kind and the sampling
                call for the abstract TPU topology config.compile.topology
                (from any host; libtpu) and write <workdir>/compile_report.json
                with memory, fit, FLOPs, collectives (compile_job.py)
Multi-host: `jax.distributed` is initialised from the environment (TPU pod,
Slurm, JAX_COORDINATOR_ADDRESS...) or from --coordinator_address,
--num_processes, --process_id (distributed.py).
Config: --config is the path of a config file, from any working directory
(configs/*.py, or a file of your own that starts from one of them with
`from configs import digits`: config_files.py). configs/default.py lists
every field with its default and meaning; override one with e.g.
`--config.train.num_steps=100`.

Exit codes (errors.py): 0 finished; 2 a user's mistake (one message, no
traceback); 75 preempted with the checkpoint saved (rerun to resume); 130
interrupted by Ctrl-C (in training the first Ctrl-C saves a checkpoint at
the step reached, a second one stops at once; preemption.py); 1, with a
traceback, a bug.
"""

import logging
import signal
import sys

from groupdiff_jax import errors


def _interrupted_while_starting(signum, frame):
  del signum, frame
  sys.stderr.write('Interrupted (Ctrl-C) while starting up: stopped at once, nothing was run.\n')
  raise SystemExit(errors.EXIT_INTERRUPTED)


if __name__ == '__main__':  # Ctrl-C during the seconds of imports below: one line, not a traceback
  signal.signal(signal.SIGINT, _interrupted_while_starting)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
from ml_collections import config_flags

from groupdiff_jax import config_files, distributed, platforms, preemption, sample_job, storage, train  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (a get_config() module), e.g. configs/digits.py. '
                                'configs/default.py lists every field with its meaning; override one with '
                                '--config.<field>=<value>, e.g. --config.train.num_steps=100.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard metrics and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'describe', 'compile'], 'What to run.')
flags.DEFINE_bool('describe_xla_check', True, 'describe: also compile small steps for XLA\'s FLOP count.')
flags.DEFINE_string('coordinator_address', None, 'Multi-process: host:port of process 0 (default: environment).')
flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process: this process\'s rank.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax (a dozen lines per checkpoint); keeps warnings, without the tracebacks its
  threads log for a failed save (checkpoint.py reports that failure as one line)."""

  def filter(self, record):
    if '/orbax/' not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.WARNING


def main(argv):
  """Runs the mode; a preempted run exits 75, an interrupted one 130 (a UserError is one message and exit 2:
  errors.run_main)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  with preemption.Interrupts() as interrupts:  # first thing: Ctrl-C in data setup or compilation is one line
    run(interrupts)


def run(interrupts):
  """The mode of the parsed flags."""
  config, workdir, mode = FLAGS.config, FLAGS.workdir, FLAGS.mode
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  platforms.skip_tpu_probe_without_tpu()  # before any backend starts
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info('JAX %s on %d %s device(s).', jax.__version__, jax.device_count(), jax.default_backend())
  if mode == 'train':
    state = train.train_and_evaluate(config, workdir, write_samples=sample_job.sample_and_save)
    if interrupts.requested:  # Ctrl-C: the checkpoint of the step reached is saved; rerun to resume
      sys.exit(errors.EXIT_INTERRUPTED)
    if int(jax.device_get(state.step)) < config.train.num_steps:
      # Preempted: the checkpoint is saved; rerun the same command to resume.
      sys.exit(errors.EXIT_PREEMPTED)
    if not sample_job.is_latent(config.model):
      params = state.ema_params if config.sample.use_ema else state.params
      report_samples(workdir, sample_job.sample_and_save(config, workdir, params, int(jax.device_get(state.step))))
  elif mode == 'describe':
    from groupdiff_jax import describe
    describe.run(config, xla_check=FLAGS.describe_xla_check)
  elif mode == 'compile':
    from groupdiff_jax import compile_job
    compile_job.run(config, workdir)
  elif mode == 'eval':
    if distributed.is_main_process():
      results, output = sample_job.evaluate_samples(config, workdir)
      print(f'FID {results["fid"]}, IS {results["inception_score"]} -> {output}')
  else:
    report_samples(workdir, sample_job.sample_and_save(config, workdir))


def report_samples(workdir, path):
  """The sample job's final output: where its npz and grid are (None: chunks still to make, or not process 0)."""
  if path is not None:
    print(f'Samples for the evaluator: {path}')
    print(f'Sample grid (each row one jointly generated group): {storage.path(workdir) / sample_job.GRID_FILE}')


def cli(argv=None):
  """The command line (argv defaults to sys.argv): the config file and its overrides are checked first
  (config_files.py), then `main` runs; exits with the code of errors.py."""
  errors.run_main(main, argv, check_argv=config_files.check_argv)


if __name__ == '__main__':
  cli()
