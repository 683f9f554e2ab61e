"""Entry point: `python -m groupdiff_jax.main --config=configs/<name>.py --workdir=DIR`.

Only flags and dispatch live here; the logic is in importable modules
(train.py, sample.py) so that tests drive it directly.

Modes:
  train         train (resuming from the workdir's latest checkpoint), then
                write a sample grid when the data are images (the demo)
  sample        load the latest checkpoint of the workdir and write a grid
Config fields are overridden with e.g. `--config.train.num_steps=100`.
"""

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from groupdiff_jax import sample, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (a get_config() module), e.g. configs/digits.py.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard metrics and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'What to run.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax (a dozen lines per checkpoint); keeps warnings."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  config = FLAGS.config
  logging.info('JAX %s on %d %s device(s).', jax.__version__, jax.device_count(), jax.default_backend())
  if FLAGS.mode == 'train':
    state = train.train_and_evaluate(config, FLAGS.workdir)
    if config.model.in_channels in (1, 3):
      params = state.ema_params if config.sample.use_ema else state.params
      sample.sample_and_save(config, FLAGS.workdir, params)
  else:
    sample.sample_and_save(config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
