"""The embedded demo: a small SiT with group attention on sklearn's digits.

  python -m groupdiff_jax.main --config=configs/digits.py --workdir=/tmp/digits

Trains a 4-block SiT (patch 2 on 16x16 digits) with GroupDiff-l groups of 4
built by ScaNN over PCA embeddings, then samples groups of 4 same-class
digits jointly into <workdir>/samples.png. About 5 minutes on 2 CPU cores.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.variant = 'SiT-S/4'
  config.model.depth = 4
  config.model.hidden_size = 128
  config.model.num_heads = 4
  config.model.input_size = 16
  config.model.in_channels = 1
  config.model.num_classes = 10
  # 'sit' (velocity, ODE samplers) | 'dit' (DDPM with learned sigma): run DiT with
  # --config.model.objective=dit --config.sample.sampler=ddpm (or ddim)
  config.model.objective = 'sit'

  config.train.batch_size = 64
  config.train.num_steps = 2000
  config.train.group_ratio = 0.25  # more groups than ImageNet's 0.1: few steps here
  config.train.log_every = 100
  config.train.checkpoint_every = 1000

  config.optim.lr = 1e-3
  config.optim.ema_decay = 0.995

  config.data.name = 'digits'
  config.data.image_size = 16
  config.data.grouping = 'official_plan'  # 'official_plan' | 'class' | 'random'
  config.data.embedding_dims = 32
  config.data.num_neighbors = 16

  config.sample.sampler = 'heun'
  config.sample.num_steps = 25
  config.sample.num_groups = 10  # one row per class
  config.sample.cfg_scale = 2.0
  return config
