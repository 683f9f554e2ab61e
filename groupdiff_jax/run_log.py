"""What a training run records about itself besides checkpoints and its monitor's grids and scores.

The config (printed once as `key = value` lines, saved as <workdir>/config.json,
TensorBoard hparams), the metric writer (absl log lines, shown on process 0
by default: distributed.py; TensorBoard events on process 0), and the
device memory scalars (bytes in use and peak of this
process's devices, the largest over them, where the backend reports them:
GPU, TPU; the CPU backend reports nothing and nothing is logged).
"""

import json

import jax
from clu import metric_writers

from groupdiff_jax import sample_chunks, storage

CONFIG_FILE = 'config.json'
GIB = 2**30


# --- The config: printed once, saved beside the checkpoints ---------------------
def flat_config(config):
  """{'train.batch_size': 256, ...}: every leaf of the config, dotted paths, sorted."""
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(f'{prefix}{key}.', value)
      else:
        flat[f'{prefix}{key}'] = value
  walk('', config.to_dict())
  return dict(sorted(flat.items()))


def config_lines(config):
  """The config as readable `key = value` lines."""
  return '\n'.join(f'{key} = {value!r}' for key, value in flat_config(config).items())


def save_config(config, workdir):
  """<workdir>/config.json (written atomically)."""
  path = str(storage.path(workdir) / CONFIG_FILE)
  sample_chunks.write_json(path, json.loads(json.dumps(config.to_dict(), default=str)))
  return path


def make_writer(workdir, is_main):
  """(metric writer, its TensorBoard writer or None): log lines plus, on process 0, TensorBoard events.

  The TensorBoard writer alone takes the hyperparameters, so the log shows
  the config once as `key = value` lines instead of one dict line.
  """
  summary = metric_writers.SummaryWriter(workdir) if is_main else None
  writers = [metric_writers.LoggingWriter()] + ([summary] if summary else [])
  return metric_writers.AsyncMultiWriter(writers), summary


# --- Device memory ----------------------------------------------------------------
def memory_scalars(devices=None):
  """{'memory_in_use_gib', 'memory_peak_gib'}: the largest over this process's devices; {} where the backend
  reports no memory statistics (CPU)."""
  stats = [d.memory_stats() for d in (jax.local_devices() if devices is None else devices)]
  stats = [s for s in stats if s and 'bytes_in_use' in s]
  if not stats:
    return {}
  out = {'memory_in_use_gib': max(s['bytes_in_use'] for s in stats) / GIB}
  if all('peak_bytes_in_use' in s for s in stats):
    out['memory_peak_gib'] = max(s['peak_bytes_in_use'] for s in stats) / GIB
  return out
