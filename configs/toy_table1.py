"""Toy reproduction of the paper's Table 1 (experiments/table1.py, docs/results.md).

  JAX_PLATFORMS=cpu python -m experiments.table1 --out=/tmp/table1   # 7 settings x 3 seeds

Result (docs/results.md), 2000 steps: 54 min on 2 shared CPU cores for the
21 runs; similarity groups beat the baseline and random groups in every
seed, and FD_toy falls with the group size (UC 1/2/4/8: 45.1, 37.2, 35.4,
30.6). At 500 steps (--num_steps=500) no trend showed.

A tiny SiT (4 blocks, width 64, patch 4 on 16x16 RGB: 16 tokens) on the generated toy
shapes (groupdiff_jax/data/toy_shapes.py: 10 shape classes, varying
colours, size, position, rotation, texture), GroupDiff-l training; the
sweep script changes train.group_size, data.grouping, train.timestep_jitter
and model.max_group_size per setting. Also trainable on its own:

  python -m groupdiff_jax.main --config=configs/toy_table1.py --workdir=/tmp/toy
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.variant = 'SiT-S/4'  # patch 4: 16 tokens per 16x16 image
  config.model.depth = 4
  config.model.hidden_size = 64
  config.model.num_heads = 4
  config.model.input_size = 16
  config.model.in_channels = 3
  config.model.num_classes = 10
  config.model.learn_sigma = False  # SiT uses only the first half; save the compute
  config.model.max_group_size = 4

  config.train.batch_size = 32
  config.train.num_steps = 2000  # docs/results.md (its shorter sweep: --num_steps=500)
  config.train.group_size = 4
  # 20% of the images in unconditional groups (ImageNet: 10%); the baseline
  # (group_ratio 0) drops 20% of the labels instead, the same CFG dropout.
  config.train.group_ratio = 0.2
  config.train.label_dropout = 0.2
  config.train.log_every = 100
  config.train.checkpoint_every = 100_000
  config.train.sample_every = 500  # progress grids (train_monitor.py); experiments/table1.py does not use them

  config.optim.lr = 1e-3
  config.optim.ema_decay = 0.995

  config.data.name = 'toy_shapes'
  config.data.image_size = 16
  config.data.num_images = 20_000
  config.data.dataset_seed = 0
  config.data.grouping = 'official_plan'  # 'official_plan' (similarity) | 'class' | 'random'
  config.data.embedding_dims = 32  # PCA of the pixels, L2-normalised: the similarity embedding
  config.data.num_neighbors = 16

  config.sample.sampler = 'euler'
  config.sample.num_steps = 12  # 12 model evaluations per branch (x2 with CFG)
  config.sample.num_groups = 8
  config.sample.images_per_group = 4
  config.sample.cond_group_size = 1
  config.sample.uncond_group_size = 4
  config.sample.cfg_scale = 1.5
  return config
