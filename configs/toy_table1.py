"""Toy reproduction of the paper's Tables 1 and 2 (experiments/table1.py, docs/results.md).

  JAX_PLATFORMS=cpu python -m experiments.table1 --out=docs/toy_table1 --json=docs/table1.json

A tiny SiT (4 blocks, width 64, patch 2 on 16x16 RGB: 64 tokens) on the
generated toy shapes (groupdiff_jax/data/toy_shapes.py: 10 shape classes,
varying colours, size 0.5-0.8, position, small rotation; solid only, see
below), GroupDiff-l
training; the sweep script changes train.group_size, data.grouping,
train.timestep_jitter and model.max_group_size per setting. Also trainable
on its own:

  python -m groupdiff_jax.main --config=configs/toy_table1.py --workdir=/tmp/toy

Sized by the baseline pilot (experiments/toy_pilot.py, docs/toy_pilot.json;
512 EMA samples of the baseline, seed 0, scored by
evaluation/toy_features.py, which is right on 98.0% of held-out real
images; FD_toy of 512 samples moves by tens between evaluations):
- patch 4 (the former default), lr 1e-3, 4000 steps: class accuracy
  16/25/30% at CFG 1.5/3/5, FD_toy 380/300/356.
- patch 2, lr 1e-3, Euler 12 steps, CFG 3: class accuracy (FD_toy) 18%
  (348), 36% (218), 49% (148), 52% (154), 55% (195) after 1000-5000 steps;
  CFG 5 gives 1-5 points more accuracy but FD_toy 700-1400, CFG 8 worse.
- the same with Euler 32 steps: no clear difference (2000 steps: 36.5% /
  FD 176; 3000 steps: 50.6% / 159).
- the same with lr 2e-3: 30% (283), 48% (191), 53% (201) after
  1000-3000 steps: faster early; at 3000 steps 4 points more accuracy,
  FD_toy 201 vs 148.
- width 96, lr 2e-3: 14% (897), 39% (227), 47% (182) after 500-1500
  steps, at 0.198 s a step (1.46x width 64): per CPU second no better
  than width 64 (47.5% after 2000 steps, ~272 s).
- batch 128 instead of 32 (patch 4): no better per step (9-10% after 1000
  steps), ~3x the time per step (cut short; not in the JSON).
Patch 2 trains at ~0.136 s a step on one CPU core (the lr 2e-3 pilot: 408 s
for 3000 steps, the process had the core: 482 CPU s in 489 s wall), so
3000 steps are ~7 min a run, 4000 steps ~9 min.
Chosen: patch 2, lr 2e-3, 3000 steps, CFG 3, Euler 12 steps: ~7 min a
baseline run. On the default data (3 textures, size 0.35-0.7) that is 53%
class accuracy, below the issue's target of 75%: the curves flatten at
50-57% by 3000-5000 steps, and the sample grids show small and
dotted/striped shapes broken.
Cleaner data (data.textures = 'solid', data.size_range = (0.5, 0.8); the
scorer retrained on it: 99.9% on 2,048 held-out images, FD_toy 1.34),
same model and budget (pilot d4w64p2_s3000_lr2e-3_solid_size0.5-0.8*):
- CFG 3: class accuracy (FD_toy) 55.9% (353), 66.0% (585), 81.8% (1004)
  after 1000 / 2000 / 3000 steps (411 s of training): the target is met,
  but FD_toy rises with the accuracy; the 3000-step grid is grainy.
- CFG 1.5, same model: 41.8% (789), 60.9% (336), 73.2% (157).
FD_toy of these runs is measured by the solid-data scorer: not comparable
with the numbers above. These data are the defaults now; CFG stays 3 (the
issue's accuracy criterion), at a high FD_toy (CFG 1.5: lower FD_toy,
accuracy just under 75%).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.variant = 'SiT-S/2'  # patch 2: 64 tokens per 16x16 image (patch 4: 16 tokens, learns ~2x slower)
  config.model.depth = 4
  config.model.hidden_size = 64
  config.model.num_heads = 4
  config.model.input_size = 16
  config.model.in_channels = 3
  config.model.num_classes = 10
  config.model.learn_sigma = False  # SiT uses only the first half; save the compute
  config.model.max_group_size = 4

  config.train.batch_size = 32
  config.train.num_steps = 3000  # pilot (docs/toy_pilot.json): baseline 81.8% class accuracy at CFG 3, ~8 min/core
  config.train.group_size = 4
  # 20% of the images in unconditional groups (ImageNet: 10%); the baseline
  # (group_ratio 0) drops 20% of the labels instead, the same CFG dropout.
  config.train.group_ratio = 0.2
  config.train.label_dropout = 0.2
  config.train.log_every = 100
  config.train.checkpoint_every = 100_000
  config.train.sample_every = 500  # progress grids (train_monitor.py); experiments/table1.py does not use them

  config.optim.lr = 2e-3  # pilot: class accuracy 30% / 53% after 1000 / 3000 steps (lr 1e-3: 18% / 49%)
  config.optim.ema_decay = 0.995

  config.data.name = 'toy_shapes'
  config.data.image_size = 16
  config.data.num_images = 20_000
  config.data.dataset_seed = 0
  # Solid shapes of size 0.5-0.8 (toy_shapes.py defaults: all 3 textures, 0.35-0.7): pilot (docstring)
  # baseline class accuracy 82% at CFG 3 after 3000 steps (53% on the default data).
  config.data.textures = 'solid'  # comma-separated names of toy_shapes.TEXTURES
  config.data.size_range = (0.5, 0.8)  # uniform shape size (toy_shapes.make_shapes)
  config.data.grouping = 'official_plan'  # 'official_plan' (similarity) | 'class' | 'random'
  config.data.embedding_dims = 32  # PCA of the pixels, L2-normalised: the similarity embedding
  config.data.num_neighbors = 16

  config.sample.sampler = 'euler'
  config.sample.num_steps = 12  # model evaluations per branch (x2 with CFG); 32 was no better in the pilot
  config.sample.num_groups = 8
  config.sample.images_per_group = 4
  config.sample.cond_group_size = 1
  config.sample.uncond_group_size = 4
  # Pilot: CFG 3 is what gets the baseline's samples over 75% class accuracy (81.8%; CFG 1.5: 73.2%), at a cost
  # in FD_toy (1004; CFG 1.5: 157).
  config.sample.cfg_scale = 3.0
  return config
