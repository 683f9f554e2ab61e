"""What convert.py writes: imported weights as a checkpoint plus the record `converted.json`, and the check of a
model config against that record (train.py's `train.init_from`, the sample job's workdir).
"""

import dataclasses
import json
import os

import orbax.checkpoint as ocp
from etils import epath

from groupdiff_jax import checkpoint, errors

RECORD_FILE = 'converted.json'
# The settings converted.json records that shapes alone cannot check (time_convention) or that a config
# must repeat (eval configs set them by hand).
RECORDED_MODEL_FIELDS = ('learn_sigma', 'max_group_size', 'time_convention')


def read_conversion_record(path) -> dict:
  """The record in directory `path` (what convert_checkpoint wrote: source, weights, architecture, ...)."""
  return json.loads((epath.Path(path) / RECORD_FILE).read_text())


def check_model_config(path, model_config) -> None:
  """Raise when `model_config` disagrees with the conversion record in directory `path`.

  Does nothing when `path` has no converted.json (a training workdir).
  The time convention matters most: a wrong one gives a model that loads
  and runs but samples noise.

  Raises:
    ConfigError (a ValueError) naming each field, both values and the override to pass.
  """
  record_path = epath.Path(path) / RECORD_FILE
  if not record_path.is_file():
    return
  architecture = read_conversion_record(path).get('architecture', {})
  configured = {name: model_config[name] for name in RECORDED_MODEL_FIELDS}
  wrong = [f'model.{name}: the config has {configured[name]!r}, {record_path} says {architecture[name]!r} '
           f'(pass --config.model.{name}={architecture[name]})'
           for name in RECORDED_MODEL_FIELDS if name in architecture and configured[name] != architecture[name]]
  if wrong:
    raise errors.ConfigError('The model config does not match the converted weights:\n  ' + '\n  '.join(wrong))


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did, written beside the params as converted.json."""
  weights: str = 'plain'  # the chosen set: model_ema | ema | model | state_dict | plain
  mapped: int = 0  # keys that became params
  ignored: dict = dataclasses.field(default_factory=dict)  # key -> why
  skipped_entries: list = dataclasses.field(default_factory=list)  # top-level checkpoint entries, not weights
  fresh: dict = dataclasses.field(default_factory=dict)  # param path -> how it was initialised
  architecture: dict = dataclasses.field(default_factory=dict)


def save_converted_params(output, params, report, source='', variant=''):
  """Write `<output>/checkpoints/0` (orbax: params and ema_params) and `<output>/converted.json`."""
  manager = checkpoint.checkpoint_manager(output, max_to_keep=1)
  if manager.latest_step() is not None:
    raise FileExistsError(f'{manager.directory} already holds a checkpoint; choose a new --output.')
  manager.save(0, args=ocp.args.StandardSave({'params': params, 'ema_params': params}))
  manager.wait_until_finished()
  record = dict(dataclasses.asdict(report), source=os.fspath(source), variant=variant)
  (epath.Path(output) / RECORD_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))


def load_converted_params(path) -> dict:
  """The params written by `convert_checkpoint` to directory `path` (nested dict of jax arrays)."""
  params, _ = checkpoint.load_params(path, use_ema=True)
  return params
