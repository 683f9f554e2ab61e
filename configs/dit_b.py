"""DiT-B/2 + GroupDiff-l-4: the recipe of dit_xl.py at DiT-B/2 size.

  python -m groupdiff_jax.main --config=configs/dit_b.py --workdir=DIR \
      --config.data.latent_dir=/data/in256_latents --config.data.neighbors_dir=/data/in256_neighbors

12 blocks, width 768, 12 heads (~130M parameters, ~23 GFLOPs per forward at
256 px), for ablations that do not need XL.
"""

from configs import dit_xl


def get_config():
  return dit_xl.get_config('DiT-B/2')
