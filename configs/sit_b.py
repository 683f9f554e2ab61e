"""SiT-B/2 + GroupDiff-l-4: the recipe of sit_xl.py on a ~130M-parameter model.

  python -m groupdiff_jax.main --config=configs/sit_b.py --workdir=DIR \
      --config.data.latent_dir=/data/in256_latents --config.data.neighbors_dir=/data/in256_neighbors

For ablations at a fraction of XL's cost (about 1/8 of the FLOPs per image;
`--mode=describe` prints them).
"""

from configs import sit_xl


def get_config():
  return sit_xl.get_config('SiT-B/2')
