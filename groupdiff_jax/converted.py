"""The conversion record `converted.json` that convert.py writes beside imported weights, and the check of a
model config against it (train.py's `train.init_from`, the sample job's workdir).
"""

import json

from etils import epath

from groupdiff_jax import errors
from groupdiff_jax.models import dit

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
  configured = {name: model_config.get(name, dit.DiT.__dataclass_fields__[name].default)
                for name in RECORDED_MODEL_FIELDS}
  wrong = [f'model.{name}: the config has {configured[name]!r}, {record_path} says {architecture[name]!r} '
           f'(pass --config.model.{name}={architecture[name]})'
           for name in RECORDED_MODEL_FIELDS if name in architecture and configured[name] != architecture[name]]
  if wrong:
    raise errors.ConfigError('The model config does not match the converted weights:\n  ' + '\n  '.join(wrong))
