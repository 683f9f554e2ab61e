"""GroupDiff-l on Fashion-MNIST (groupdiff_jax/data/fashion_mnist.py; issue 31's study).

Needs the Debian package (60,000 training and 10,000 test images):

  apt-get install -y dataset-fashion-mnist

The study (Table 1 x 3 seeds, Table 2, learning curve, CFG sweeps; resumable,
one core at nice 10, output outside the repository, run from a frozen
checkout so later edits do not reach it):

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false JAX_PLATFORMS=cpu \
      nice -n 10 taskset -c 1 python -m experiments.fashion_table1 --out=/work/fashion_sweep2
  python -m experiments.fashion_table1 --out=/work/fashion_sweep2 --report_only   # docs/fashion_table1.json

Train one model on its own:

  python -m groupdiff_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/fashion

Images are the 28x28 originals padded to 32x32 (background), patch 4: 64
tokens of 16 pixels, the token count of the toy study. A tiny SiT of the
toy study's size and recipe (4 blocks, width 64, batch 32, lr 2e-3 constant,
EMA 0.995, Euler 12 steps), 4,000 steps, sized by the pilot
(experiments/fashion_pilot.py, docs/fashion_pilot.json): ~0.14 CPU-s per
step; the baseline at step 1,500 already had class accuracy 0.83 at CFG 3
(0.69 at CFG 1.5) with recognisable, blocky samples; 4,000 steps keep the
whole sweep at ~11 h of one core (experiments/fashion_table1.py, Budget).
Similarity groups use the neighbour lists in data.neighbors_dir (the study
writes them from its learned encoder, evaluation/fashion_classifier.py);
left empty, the pixels' PCA.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.variant = 'SiT-S/4'
  config.model.depth = 4
  config.model.hidden_size = 64
  config.model.num_heads = 4
  config.model.input_size = 32
  config.model.in_channels = 1
  config.model.num_classes = 10
  config.model.learn_sigma = False
  config.model.max_group_size = 4

  config.train.batch_size = 32
  config.train.num_steps = 4000
  config.train.group_size = 4
  config.train.group_ratio = 0.125  # one group of 4 in every step of 32 (official 0.1: 0.8 groups, rounded to 1)
  config.train.label_dropout = 0.125  # the baseline (group_ratio 0): the same CFG dropout rate
  config.train.log_every = 100
  config.train.checkpoint_every = 100_000

  config.optim.lr = 2e-3
  config.optim.ema_decay = 0.995

  config.data.name = 'fashion_mnist'
  config.data.data_dir = ''  # '' = the Debian package's /usr/share/datasets/fashion-mnist
  config.data.image_size = 32  # 32: padded originals; 16: 2x2 means of those; 28: as stored
  config.data.grouping = 'official_plan'  # 'official_plan' (similarity) | 'class' | 'random'
  config.data.neighbors_dir = ''  # neighbors.npy over the training split; '' = ScaNN over the pixels' PCA
  config.data.embedding_dims = 32
  config.data.num_neighbors = 16

  config.sample.sampler = 'euler'
  config.sample.num_steps = 12
  config.sample.num_groups = 8
  config.sample.images_per_group = 4
  config.sample.cond_group_size = 1
  config.sample.uncond_group_size = 4
  config.sample.cfg_scale = 1.5
  return config
