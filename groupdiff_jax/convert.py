"""Official DiT / SiT / REPA-SiT / GroupDiff PyTorch weights -> Flax params of `models.dit.DiT`.

Command (the output directory becomes a workdir that `--mode=sample` reads):

  python -m groupdiff_jax.convert --source=released_model/gdiff-l-4-sit-xl-2-repa-resume.pth \\
      --output=/ckpt/gdiff-sit-xl --variant=SiT-XL/2
  python -m groupdiff_jax.main --config=configs/eval_gdiff_sit_xl.py --workdir=/ckpt/gdiff-sit-xl --mode=sample

Sources (all the same tensors, PyTorch layout):
  * official DiT-XL-2-256x256.pt / SiT-XL-2-256x256.pt: a plain state dict;
  * official GroupDiff `gdiff-l-4-{dit-xl-2,sit-xl-2-repa}-resume.pth`: a dict
    with `model` and `model_ema` state dicts whose keys sit under `denoiser.`
    (plus optimizer state etc., which is skipped); DiT/REPA training
    checkpoints use `model` / `ema`;
  * `.safetensors` or `.npz` holding either a plain state dict or the
    containers flattened as `model_ema.denoiser.blocks.0...`. These need no
    torch. To make one from a `.pth` on a machine with torch:
      python -c "import torch, safetensors.torch as st; c = torch.load('in.pth', map_location='cpu');
      st.save_file({f'{n}.{k}': v.float().clone() for n in ('model', 'model_ema') for k, v in c[n].items()},
      'out.safetensors')"
  Reading `.pt`/`.pth` needs torch (an optional dependency, imported only
  then); `weights_only=True` unless `--allow_pickle` (only for trusted files,
  e.g. DiT/REPA training checkpoints that pickle their argparse namespace).

Which weights: `--use_ema` (default) takes `model_ema` (or `ema`), else
`model`; a plain state dict is taken as it is. Prefixes `module.` (DDP),
`_orig_mod.` (torch.compile) and `denoiser.` (GroupDiff) are stripped.

The mapping is one declarative table, `RENAME_TABLE` (official module ->
our module, layout), with per-layout leaf rules `LEAF_RULES` (weights_io
layouts: Linear [out, in] -> Dense kernel [in, out]; the patch conv OIHW ->
HWIO; embedding tables as they are), run by weights_io's import engine:
every key is mapped to a distinct leaf of the model's `jax.eval_shape` tree
with its shape checked, or matched by `IGNORED_KEYS` (REPA's projector
heads; `pos_embed`, compared with our fixed sin-cos embedding, then
dropped); `UNSUPPORTED_KEYS` name layouts our model lacks. All problems come
in one weights_io.WeightsImportError naming the keys and shapes.

"From pretrained" (the paper's 1400+100 epoch runs): a plain DiT/SiT state
dict imported into a model with `max_group_size > 0` has no
`sample_embedder`; its table is initialised fresh (normal, std 0.02, from
`--seed`), as the official init, and the report says so.

Output (converted.py): an orbax checkpoint at `<output>/checkpoints/0`
holding `{'params': P, 'ema_params': P}` (so `checkpoint.load_params` works
whatever `sample.use_ema` says) and `<output>/converted.json`, the record
(source, selected weights, inferred architecture, ignored keys, fresh
params). Fine-tune with `--config.train.init_from=<output>` in a new workdir
(step 0, fresh optimizer; train.py checks the config against the record).

Time convention: the official GroupDiff SiT and REPA's SiT (files without
learned sigma) run time the other way from ours (their t = 1 is noise) and
predict noise - data. The converter records `time_convention:
groupdiff_official` for them (`--time_convention` overrides) and the config
must set `model.time_convention` to it: the model then feeds the network
1 - t and negates its prediction (models/dit.py), so our samplers and
trainer work unchanged. The weights themselves are not changed.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from groupdiff_jax import converted, errors, weights_io
from groupdiff_jax.models import dit, embeddings, official_names

# ------------------------------------------------------------------------------------------ the declarative mapping

# Official module -> our module, layout: the shared table of models/official_names.py.
RENAME_TABLE = official_names.RENAME_TABLE


# (layout, official leaf) -> (our leaf, weights_io layout: our shape <-> official shape, official array -> ours)
LEAF_RULES = {
    ('linear', 'weight'): ('kernel', weights_io.LINEAR),
    ('linear', 'bias'): ('bias', weights_io.SAME),
    ('conv', 'weight'): ('kernel', weights_io.CONV),
    ('conv', 'bias'): ('bias', weights_io.SAME),
    ('embedding', 'weight'): ('embedding', weights_io.SAME),
}

# Keys that are consumed without becoming params (regex on the key after prefix stripping) -> why.
IGNORED_KEYS = (
    (r'pos_embed', 'fixed 2-D sin-cos buffer: checked against ours, then dropped'),
    (r'projectors\.\d+\.[024]\.(weight|bias)', 'REPA alignment projector head (training only)'),
)
# Layouts of related models that ours does not implement (regex -> why the file cannot be imported).
UNSUPPORTED_KEYS = (
    (r'blocks\.\d+\.attn\.[qk]_norm\..*', 'qk-norm attention (REPA --qk-norm); our attention has no qk-norm'),
    (r'(blocks\.\d+\.(cross_attn|norm_cross)|context_proj|image_proj|image_norm)\..*',
     'cross-attention conditioning of an extended Denoiser; not in our model'),
)

PREFIXES = ('module.', '_orig_mod.', 'denoiser.')  # stripped from the front of every key, in any order
EMA_CONTAINERS = ('model_ema', 'ema')  # GroupDiff / DiT, SiT, REPA training checkpoints
RAW_CONTAINERS = ('model', 'state_dict')
# pos_embed values are in [-1, 1]: bf16 storage rounds them by < 4e-3; a different embedding (axes swapped,
# another grid or base) differs by O(1) somewhere.
POS_EMBED_ATOL = 1e-2
SAMPLE_EMBED_INIT_STD = 0.02  # official GroupDiff init of sample_embedder.embedding_table


def _template_regex(template):
  return re.compile(re.escape(template).replace(re.escape('{i}'), r'(?P<i>\d+)') + '$')


_RULES = [(_template_regex(official), official, ours, layout) for official, ours, layout in RENAME_TABLE]
_OURS_RULES = [(_template_regex(ours), official, ours, layout) for official, ours, layout in RENAME_TABLE]


def our_path(key: str):
  """Official key (prefixes stripped) -> (our param path tuple, weights_io layout). KeyError if outside the table."""
  module, _, leaf = key.rpartition('.')
  for regex, _, ours, layout in _RULES:
    match = regex.match(module)
    if match and (layout, leaf) in LEAF_RULES:
      ours_leaf, rule = LEAF_RULES[(layout, leaf)]
      return tuple(ours.format(**match.groupdict()).split('/')) + (ours_leaf,), rule
  raise KeyError(key)


def official_key(path: tuple[str, ...]) -> str:
  """Our param path -> its official state-dict key (to name what is missing)."""
  module, leaf = '/'.join(path[:-1]), path[-1]
  for regex, official, _, layout in _OURS_RULES:
    match = regex.match(module)
    if match:
      for (rule_layout, official_leaf), (ours_leaf, _) in LEAF_RULES.items():
        if rule_layout == layout and ours_leaf == leaf:
          return f'{official.format(**match.groupdict())}.{official_leaf}'
  raise KeyError(path)


def expected_param_shapes(model: dit.DiT) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of the model's params from `jax.eval_shape` of its init (no memory used)."""
  side = model.input_size
  x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  ids = jax.ShapeDtypeStruct((1,), jnp.int32)
  return weights_io.param_shapes(model.init, x, t, ids, ids)


# ------------------------------------------------------------------------------------------ reading files


def _is_array(value):
  return hasattr(value, 'shape') and hasattr(value, 'dtype')


def flatten_checkpoint(obj: Mapping) -> tuple[dict[str, Any], list[str]]:
  """A loaded checkpoint object -> (flat {key: array}, skipped top-level entries).

  A mapping of arrays is a plain state dict. Otherwise the entries named in
  EMA_CONTAINERS / RAW_CONTAINERS that are mappings of arrays are flattened as
  `<container>.<key>`; every other entry (optimizer, epoch, args ...) is
  skipped and named.
  """
  if all(_is_array(v) for v in obj.values()):
    return dict(obj), []
  flat, skipped = {}, []
  for name, value in obj.items():
    if name in EMA_CONTAINERS + RAW_CONTAINERS and isinstance(value, Mapping):
      flat.update({f'{name}.{k}': v for k, v in value.items()})
    else:
      skipped.append(str(name))
  return flat, skipped


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
  """Read `.safetensors`, `.npz` (NumPy only) or `.pt`/`.pth` (torch) -> (flat {key: array}, skipped entries)."""
  return weights_io.read_weights(path, '(--source): pass the official .pth, or a .safetensors/.npz made from it.',
                                 allow_pickle, flatten=flatten_checkpoint)


def select_weights(flat: Mapping[str, Any], use_ema: bool = True) -> tuple[dict[str, Any], str]:
  """Pick one state dict out of flat keys and strip PREFIXES -> ({key: array}, name of the chosen set).

  Keys `<container>.<key>` (container in EMA_CONTAINERS / RAW_CONTAINERS)
  hold several sets: use_ema takes the first EMA container present, else the
  raw one. Keys without a container are a plain state dict ('plain').
  """
  containers = EMA_CONTAINERS + RAW_CONTAINERS
  present = sorted({k.split('.', 1)[0] for k in flat if k.split('.', 1)[0] in containers})
  if present:
    plain = [k for k in flat if k.split('.', 1)[0] not in containers]
    if plain:
      raise weights_io.WeightsImportError(f'Keys both inside containers {present} and outside any: {plain[:5]}.')
    wanted = EMA_CONTAINERS if use_ema else RAW_CONTAINERS
    chosen = next((name for name in wanted if name in present), None)
    if chosen is None:
      raise weights_io.WeightsImportError(f'No {"EMA" if use_ema else "raw"} weights ({" or ".join(wanted)}) in the file; it '
                            f'holds {present}. Use {"--nouse_ema" if use_ema else "--use_ema"}.')
    state = {k.split('.', 1)[1]: v for k, v in flat.items() if k.split('.', 1)[0] == chosen}
  else:
    chosen, state = 'plain', dict(flat)

  stripped = {}
  for key, value in state.items():
    short = key
    while short.startswith(PREFIXES):
      short = short[next(len(p) for p in PREFIXES if short.startswith(p)):]
    if short in stripped:
      raise weights_io.WeightsImportError(f'{key} collides with another key after stripping prefixes {PREFIXES}: {short}.')
    stripped[short] = value
  return stripped, chosen


# ------------------------------------------------------------------------------------------ conversion


def _check_pos_embed(key, value, model, problems):
  grid = model.input_size // model.patch_size
  expected = (1, grid * grid, model.hidden_size)
  if tuple(value.shape) not in (expected, expected[1:]):
    problems.append(f'{key}: expected {expected} (input_size {model.input_size}, patch {model.patch_size}), '
                    f'found {tuple(value.shape)}')
    return
  ours = embeddings.sincos_2d_position_embedding(model.hidden_size, grid)
  atol = POS_EMBED_ATOL
  error = float(np.abs(np.asarray(value, np.float64).reshape(ours.shape) - ours).max())
  if error > atol:
    problems.append(f'{key}: differs from our fixed sin-cos embedding by {error:.3g} (> {atol}); the model would '
                    'see other positions')


def convert_state_dict(state: Mapping[str, Any], model: dit.DiT, seed: int = 0,
                       source: str | os.PathLike = '') -> tuple[dict, converted.ConversionReport]:
  """Official-layout state dict (prefixes already stripped) -> (params of `model`, report).

  source: the file the state dict came from, named in errors ('' for none).

  Raises:
    weights_io.WeightsImportError naming the file and every unknown,
    unsupported, wrongly shaped or missing key (shapes in the PyTorch layout).
  """
  expected = expected_param_shapes(model)
  report = converted.ConversionReport()
  other = []
  if 'pos_embed' in state:
    _check_pos_embed('pos_embed', np.asarray(state['pos_embed']), model, other)
  from_pretrained = not any(key.startswith('sample_embedder.') for key in state)  # a plain DiT/SiT file
  fresh = lambda path: path[0] == 'sample_embedder' and from_pretrained
  flat, report.ignored = weights_io.import_state_dict(
      state, expected, our_path, ignore=IGNORED_KEYS, unsupported=UNSUPPORTED_KEYS, problems=other,
      header=f'State dict{weights_io.source_label(source)} does not match {_describe(model)}:',
      unknown_note=lambda path: (' (the model has max_group_size=0: pass --max_group_size)'
                                 if path[0] == 'sample_embedder' else ''),
      missing_name=lambda p: f'{official_key(p)}: expected {_official_shape(p, expected)} (our {"/".join(p)})',
      optional=fresh)
  rng = np.random.default_rng(seed)
  for path in sorted(expected):
    if path not in flat and fresh(path):
      flat[path] = (SAMPLE_EMBED_INIT_STD * rng.standard_normal(expected[path])).astype(np.float32)
      report.fresh['/'.join(path)] = f'normal(std={SAMPLE_EMBED_INIT_STD}, seed={seed}): from-pretrained import'

  report.mapped = len(flat) - len(report.fresh)
  report.architecture = _architecture(model)
  return weights_io.unflatten(flat), report


def _official_shape(path, expected):
  return our_path(official_key(path))[1].source_shapes(expected[path])[0]


def _architecture(model):
  fields = ('input_size', 'in_channels', 'patch_size', 'hidden_size', 'depth', 'num_heads', 'mlp_ratio',
            'num_classes', 'learn_sigma', 'max_group_size', 'time_convention')
  return {name: getattr(model, name) for name in fields}


def _describe(model):
  return 'DiT(' + ', '.join(f'{k}={v}' for k, v in _architecture(model).items()) + ')'


def infer_architecture(state: Mapping[str, Any], patch_size: int, in_channels: int) -> dict:
  """What the file says about the settings that differ between releases.

  learn_sigma: final_layer.linear has p*p*2*in_channels outputs (DiT, SiT)
  or p*p*in_channels (REPA SiT, GroupDiff SiT). max_group_size: rows of the
  sample table, 0 without one. time_convention follows learn_sigma: the
  releases without learned sigma (REPA's SiT and the GroupDiff SiT resumed
  from it) are trained with t = 1 as noise and predict noise - data
  ('groupdiff_official': official GroupDiff transport/path.py ICPlan and
  REPA loss.py, alpha_t = 1 - t on the data); those with it (DiT, willisma
  SiT) are ours ('sit', also DiT's, whose integer timesteps need no
  adapter). A setting the file does not decide is left out.
  """
  found = {}
  final = state.get('final_layer.linear.weight')
  if final is not None:
    outputs = patch_size * patch_size * in_channels
    if final.shape[0] in (outputs, 2 * outputs):
      found['learn_sigma'] = final.shape[0] == 2 * outputs
      found['time_convention'] = 'sit' if found['learn_sigma'] else 'groupdiff_official'
  table = state.get('sample_embedder.embedding_table.weight')
  found['max_group_size'] = int(table.shape[0]) if table is not None else 0
  return found


# ------------------------------------------------------------------------------------------ files in, files out


def convert_checkpoint(source, output, variant, *, use_ema=True, max_group_size=None, learn_sigma=None,
                       time_convention=None, input_size=32, in_channels=4, num_classes=1000, seed=0,
                       allow_pickle=False, model_overrides=None):
  """Read `source`, convert, and write the params to `output` (see the module docstring). Returns the report.

  max_group_size / learn_sigma / time_convention None: taken from the file
  (`infer_architecture`; 'sit' when the file does not say).
  model_overrides: extra `dit.DiT` fields (tests use a tiny depth/hidden size).
  """
  flat, skipped = read_checkpoint(source, allow_pickle)
  state, chosen = select_weights(flat, use_ema)
  del flat  # the unselected set (raw or EMA) need not stay in memory
  arch = dit.parse_variant(variant)
  arch.update(model_overrides or {})
  inferred = infer_architecture(state, arch['patch_size'], in_channels)
  if max_group_size is None:
    max_group_size = inferred['max_group_size']
  if learn_sigma is None:
    learn_sigma = inferred.get('learn_sigma', True)
  if time_convention is None:
    time_convention = inferred.get('time_convention', 'sit')
  model = dit.DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma,
                  max_group_size=max_group_size, time_convention=time_convention, **arch)
  params, report = convert_state_dict(state, model, seed, source)
  report.weights, report.skipped_entries = chosen, skipped
  for path, how in report.fresh.items():
    logging.warning('%s is not in %s: initialised fresh, %s.', path, source, how)
  converted.save_converted_params(output, params, report, source, variant)
  return report


# ------------------------------------------------------------------------------------------ command line


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  report = convert_checkpoint(
      f.source, f.output, f.variant, use_ema=f.use_ema, max_group_size=f.max_group_size,
      learn_sigma=None if f.learn_sigma == 'auto' else f.learn_sigma == 'true',
      time_convention=None if f.time_convention == 'auto' else f.time_convention, input_size=f.input_size,
      in_channels=f.in_channels, num_classes=f.num_classes, seed=f.seed, allow_pickle=f.allow_pickle)
  print(f'Converted {report.mapped} tensors ({report.weights} weights) of {f.source} into {f.output}.')
  print(f'Architecture: {report.architecture} (set these model.* fields in the config)')
  for key, why in report.ignored.items():
    print(f'  ignored {key}: {why}')
  for path, how in report.fresh.items():
    print(f'  fresh {path}: {how}')
  if report.skipped_entries:
    print(f'  skipped checkpoint entries (not weights): {", ".join(report.skipped_entries)}')


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('source', None, '.pt/.pth (needs torch), .safetensors or .npz of official weights.')
  flags.DEFINE_string('output', None, 'New directory for the orbax checkpoint and converted.json.')
  flags.DEFINE_string('variant', None, 'Our architecture name, e.g. SiT-XL/2 or DiT-XL/2.')
  flags.DEFINE_bool('use_ema', True, 'Take model_ema/ema from a training checkpoint (else model).')
  flags.DEFINE_integer('max_group_size', None, 'Sample-embedding rows; default: as in the file (0 if none). '
                       '>0 with a plain DiT/SiT file initialises a fresh table (from pretrained).')
  flags.DEFINE_enum('learn_sigma', 'auto', ['auto', 'true', 'false'], 'Default: from final_layer.linear.')
  flags.DEFINE_enum('time_convention', 'auto', ['auto', *dit.TIME_CONVENTIONS],
                    'Time direction the weights were trained with (recorded in converted.json; the config\'s '
                    'model.time_convention must match). auto: groupdiff_official for files without learned sigma '
                    '(GroupDiff/REPA SiT: t = 1 is noise, velocity noise - data), else sit.')
  flags.DEFINE_integer('input_size', 32, 'Latent side (256 px / 8).')
  flags.DEFINE_integer('in_channels', 4, 'Latent channels.')
  flags.DEFINE_integer('num_classes', 1000, 'Classes (the file holds one more row, the null class).')
  flags.DEFINE_integer('seed', 0, 'Seed of freshly initialised params (the sample embedding).')
  flags.DEFINE_bool('allow_pickle', False, 'torch.load with weights_only=False (trusted files only).')
  flags.mark_flags_as_required(['source', 'output', 'variant'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_flags()
  errors.run_main(main)
