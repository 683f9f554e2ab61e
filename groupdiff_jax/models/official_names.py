"""Our DiT/SiT parameter paths <-> the official PyTorch state-dict names.

One declarative table, `RENAME_TABLE` (official module -> our module,
layout; `{i}` = block index), used by the checkpoint converter (convert.py)
and by the optimizer's weight-decay mask (train_step.decay_mask), which
follows the official rule by PyTorch name. The official names are those of
`models/denoiser.py` in the official GroupDiff code (the DiT layout plus the
sample embedder), without the `denoiser.` / `module.` prefixes, which hold
none of the no-decay keywords.
"""

import re

RENAME_TABLE = (
    ('x_embedder.proj', 'x_embedder/proj', 'conv'),
    ('t_embedder.mlp.0', 't_embedder/mlp_0', 'linear'),
    ('t_embedder.mlp.2', 't_embedder/mlp_2', 'linear'),
    ('y_embedder.embedding_table', 'y_embedder/embedding_table', 'embedding'),
    ('sample_embedder.embedding_table', 'sample_embedder/embedding_table', 'embedding'),
    ('blocks.{i}.attn.qkv', 'blocks_{i}/attn/qkv', 'linear'),
    ('blocks.{i}.attn.proj', 'blocks_{i}/attn/proj', 'linear'),
    ('blocks.{i}.mlp.fc1', 'blocks_{i}/mlp/fc1', 'linear'),
    ('blocks.{i}.mlp.fc2', 'blocks_{i}/mlp/fc2', 'linear'),
    ('blocks.{i}.adaLN_modulation.1', 'blocks_{i}/adaLN_modulation_1', 'linear'),
    ('final_layer.linear', 'final_layer/linear', 'linear'),
    ('final_layer.adaLN_modulation.1', 'final_layer/adaLN_modulation_1', 'linear'),
)

# (layout, our leaf) -> official leaf.
LEAF_NAMES = {
    ('linear', 'kernel'): 'weight',
    ('linear', 'bias'): 'bias',
    ('conv', 'kernel'): 'weight',
    ('conv', 'bias'): 'bias',
    ('embedding', 'embedding'): 'weight',
}

# Official AdamW (utils/builders.py, create_optimizer_and_scaler): no weight decay for tensors of fewer than
# 2 dims or whose name contains one of these (case-sensitive substring test).
NO_DECAY_KEYWORDS = ('ln', 'bias', 'embedding', 'norm', 'gamma', 'embed', 'token', 'diffloss')


def _template_regex(template):
  return re.compile(re.escape(template).replace(re.escape('{i}'), r'(?P<i>\d+)') + '$')


_OURS_RULES = [(_template_regex(ours), official, layout) for official, ours, layout in RENAME_TABLE]


def official_key(path: tuple[str, ...]) -> str:
  """Our param path, e.g. ('blocks_0', 'attn', 'qkv', 'kernel') -> 'blocks.0.attn.qkv.weight'. KeyError if none."""
  module, leaf = '/'.join(path[:-1]), path[-1]
  for regex, official, layout in _OURS_RULES:
    match = regex.match(module)
    if match and (layout, leaf) in LEAF_NAMES:
      return f'{official.format(**match.groupdict())}.{LEAF_NAMES[(layout, leaf)]}'
  raise KeyError(path)


def officially_decayed(name: str, ndim: int) -> bool:
  """The official weight-decay rule on a PyTorch parameter name and its number of dims."""
  return ndim >= 2 and not any(keyword in name for keyword in NO_DECAY_KEYWORDS)
