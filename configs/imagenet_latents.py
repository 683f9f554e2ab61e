"""GroupDiff-l-4 on ImageNet 256 from a latent store (the official recipe of default.py).

  python -m groupdiff_jax.main --config=configs/imagenet_latents.py --workdir=/ckpt/gdiff-l-4 \
      --config.data.latent_dir=/data/in256_latents --config.data.neighbors_dir=/data/in256_neighbors

The store comes from `python -m groupdiff_jax.data.extract_latents_job`, the
neighbour lists from `python -m groupdiff_jax.data.neighbors_job` (see their
docstrings). Class and random grouping need no neighbour lists.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'latents'
  config.data.latent_dir = ''  # latents.npy, labels.npy, meta.json (docs/method.md, Data formats)
  config.data.neighbors_dir = ''  # neighbors.npy, scores.npy, meta.json
  config.data.grouping = 'official_plan'  # 'official_plan' | 'tau_random' | 'class' | 'random'
  config.data.tau = 0.7  # tau_random: cosine threshold (paper)
  config.data.random_flip = True  # used only when the store holds flipped copies
  config.data.prefetch = 2  # steps assembled ahead
  return config
