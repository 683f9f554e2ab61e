"""SiT-S/2 + GroupDiff-l-4: the recipe of sit_xl.py on a ~33M-parameter model.

  python -m groupdiff_jax.main --config=configs/sit_s.py --workdir=DIR \
      --config.data.latent_dir=/data/in256_latents --config.data.neighbors_dir=/data/in256_neighbors

The smallest ImageNet config: pipeline checks and quick sweeps.
"""

from configs import sit_xl


def get_config():
  return sit_xl.get_config('SiT-S/2')
