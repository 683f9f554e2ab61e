"""The rows of the Fashion-MNIST study (experiments/fashion_table1.py) and their configs.

Table 1 (trained, 3 seeds): the baseline (plain SiT, label dropout) and
GroupDiff-l with unconditional groups of UC images, grouped by the learned
encoder's neighbours ('sim'), the pixels' PCA neighbours ('pca'), at random
or by class; sigma_tv 100; the alternating composition ('alt') against the
default mixed step. Table 2 (sampling-only): the trained sim_uc4 model with
group attention only in the first 0.2/0.4/0.6 of the trajectory, at no step
(the reference: does group attention help at all?), or without it in the
first / last third of the blocks. Long pair (table 4): the
baseline and sim_uc4 trained LONG_FACTOR times longer.
"""

import dataclasses
from typing import Optional

from experiments import table1_settings
from experiments.table1_settings import removed_group_layers
from groupdiff_jax.models import dit

LONG_FACTOR = 4
NEIGHBOURS = ('encoder', 'pca')


@dataclasses.dataclass(frozen=True)
class Setting:
  description: str
  group_size: int
  grouping: Optional[str]  # data.grouping of training (None: baseline)
  neighbours: str = 'encoder'  # which neighbour lists 'official_plan' uses: NEIGHBOURS
  timestep_jitter: float = 0.0
  mixed_steps: bool = True
  steps_factor: int = 1
  table: int = 1
  trained_from: Optional[str] = None
  group_stage_fraction: float = 1.0
  remove_group_layers: Optional[str] = None


SETTINGS = {
    'baseline': Setting('Baseline (C=1, UC=1)', 1, None),
    'sim_uc2': Setting('UC=2, learned-encoder neighbours', 2, 'official_plan'),
    'sim_uc4': Setting('UC=4, learned-encoder neighbours', 4, 'official_plan'),
    'sim_uc8': Setting('UC=8, learned-encoder neighbours', 8, 'official_plan'),
    'pca_uc4': Setting('UC=4, pixel-PCA neighbours', 4, 'official_plan', neighbours='pca'),
    'random_uc4': Setting('UC=4, random', 4, 'random'),
    'class_uc4': Setting('UC=4, class', 4, 'class'),
    'sim_uc4_tv100': Setting('UC=4, learned-encoder + sigma_tv 100', 4, 'official_plan', timestep_jitter=0.1),
    'alt_uc4': Setting('UC=4, learned-encoder, alternating steps', 4, 'official_plan', mixed_steps=False),
    'sim_uc4_stage0.2': Setting('sim_uc4, group attention in 0-0.2', 4, 'official_plan', table=2,
                                trained_from='sim_uc4', group_stage_fraction=0.2),
    'sim_uc4_stage0.4': Setting('sim_uc4, group attention in 0-0.4', 4, 'official_plan', table=2,
                                trained_from='sim_uc4', group_stage_fraction=0.4),
    'sim_uc4_stage0.6': Setting('sim_uc4, group attention in 0-0.6', 4, 'official_plan', table=2,
                                trained_from='sim_uc4', group_stage_fraction=0.6),
    # Not one of the paper's rows: the reference the others need to say whether group attention helps at all.
    'sim_uc4_stage0': Setting('sim_uc4, no group attention at any sampling step', 4, 'official_plan', table=2,
                              trained_from='sim_uc4', group_stage_fraction=0.0),
    'sim_uc4_no_first': Setting('sim_uc4, none in the first third of the blocks', 4, 'official_plan', table=2,
                                trained_from='sim_uc4', remove_group_layers='first'),
    'sim_uc4_no_last': Setting('sim_uc4, none in the last third of the blocks', 4, 'official_plan', table=2,
                               trained_from='sim_uc4', remove_group_layers='last'),
    'baseline_long': Setting(f'Baseline, {LONG_FACTOR}x steps', 1, None, steps_factor=LONG_FACTOR, table=4),
    'sim_uc4_long': Setting(f'sim_uc4, {LONG_FACTOR}x steps', 4, 'official_plan', steps_factor=LONG_FACTOR, table=4),
}
DEFAULT_SETTINGS = tuple(SETTINGS)

# (name, a, b, the paper's direction of FD(a) - FD(b)); FD lower is better.
COMPARISONS = (
    ('UC=4 learned-encoder vs baseline', 'sim_uc4', 'baseline', 'lower'),
    ('learned-encoder vs random (UC=4)', 'sim_uc4', 'random_uc4', 'lower'),
    ('learned-encoder vs class (UC=4)', 'sim_uc4', 'class_uc4', 'lower'),
    ('learned-encoder vs pixel-PCA (UC=4)', 'sim_uc4', 'pca_uc4', 'lower'),
    ('UC growth 2 -> 4', 'sim_uc4', 'sim_uc2', 'lower'),
    ('UC growth 4 -> 8', 'sim_uc8', 'sim_uc4', 'lower'),
    ('sigma_tv 100 vs 0 (UC=4)', 'sim_uc4_tv100', 'sim_uc4', 'lower'),
    ('mixed vs alternating steps (UC=4)', 'sim_uc4', 'alt_uc4', 'lower'),
    ('group attention in 0-0.4 vs all', 'sim_uc4_stage0.4', 'sim_uc4', 'lower'),
    ('group attention in 0-0.2 vs all', 'sim_uc4_stage0.2', 'sim_uc4', 'lower'),
    ('group attention in 0-0.6 vs all', 'sim_uc4_stage0.6', 'sim_uc4', 'lower'),
    # The paper's direction: group attention helps, so sampling the same model without it is worse.
    ('no group attention at sampling vs all (UC=4)', 'sim_uc4_stage0', 'sim_uc4', 'higher'),
    ('group attention in 0-0.2 vs none', 'sim_uc4_stage0.2', 'sim_uc4_stage0', 'lower'),
    ('group attention in 0-0.2 vs baseline', 'sim_uc4_stage0.2', 'baseline', 'lower'),
    ('UC=4 model with no group attention at sampling vs baseline', 'sim_uc4_stage0', 'baseline', 'lower'),
    ('no group attention in first vs last blocks', 'sim_uc4_no_first', 'sim_uc4_no_last', 'higher'),
    (f'UC=4 vs baseline at {LONG_FACTOR}x steps', 'sim_uc4_long', 'baseline_long', 'lower'),
)


def check_settings(names):
  """The requested names, with the trained rows that sampling-only rows need added before them."""
  return table1_settings.check_settings(names, SETTINGS)


def training_config(base, name, seed, neighbour_dirs):
  """The config a row's model is trained with (a sampling-only row: its source's).

  neighbour_dirs: {'encoder': dir, 'pca': dir} of the neighbour job's outputs.
  """
  setting = SETTINGS[name]
  if setting.trained_from:
    return training_config(base, setting.trained_from, seed, neighbour_dirs)
  config = table1_settings.training_config(base, name, seed, SETTINGS)  # groups, label dropout, jitter
  with config.unlocked():
    config.train.num_steps = base.train.num_steps * setting.steps_factor
    if setting.group_size > 1:
      config.data.neighbors_dir = neighbour_dirs[setting.neighbours] if setting.grouping == 'official_plan' else ''
      config.train.mixed_steps = setting.mixed_steps
  return config


def sampling_config(train_config, name, num_samples, cfg_scale, interval):
  """One sampling of a row: GroupDiff-l inference (conditional branch per image, unconditional over the group)."""
  setting = SETTINGS[name]
  config = train_config.copy_and_resolve_references()
  with config.unlocked():
    per_group = setting.group_size if setting.group_size > 1 else 4
    config.sample.images_per_group = per_group
    config.sample.cond_group_size = 1
    config.sample.uncond_group_size = setting.group_size
    config.sample.num_groups = num_samples // per_group
    config.sample.group_stage_fraction = setting.group_stage_fraction
    config.sample.cfg_scale = cfg_scale
    config.sample.guidance_low, config.sample.guidance_high = interval
    if setting.remove_group_layers:
      depth = config.model.depth or dit.parse_variant(config.model.variant)['depth']
      config.model.group_layers = removed_group_layers(depth, setting.remove_group_layers)
  return config
