"""DiT-XL/2 + GroupDiff-l-4 on ImageNet 256 latents: the official recipe.

  python -m groupdiff_jax.main --config=configs/dit_xl.py --workdir=DIR \
      --config.data.latent_dir=/data/in256_latents --config.data.neighbors_dir=/data/in256_neighbors

Objective: DiT's Gaussian diffusion (1000 linear-beta steps, epsilon
prediction, learned-range variance, hybrid loss = MSE + VLB), integer
timesteps shared within a group (train.timestep_jitter 0; the paper's
sigma_tv = 100 steps is 0.1). Training, data and precision as
configs/sit_xl.py (official GroupDiff: AdamW 1e-4, betas (0.9, 0.95), wd
0.01, clip 3.0, EMA 0.9999, 256 images per step, 10% of the images in
unconditional groups of 4, 800 epochs).

Sampling as the released gdiff-l-4-dit-xl-2 checkpoint's FID-50K setting:
DDPM ancestral over 250 respaced steps, CFG 1.65 on all 4 channels,
interval [0, 1] (noise levels, samplers.py), conditional branch per image,
unconditional branch over the group of 4. Expected (paper, FID-50K, 800
epochs): 1.66 (DiT-XL/2 baseline at 1400 epochs: 2.27).
"""

from configs import sit_xl


def get_config(variant='DiT-XL/2'):
  config = sit_xl.get_config(variant)
  config.model.objective = 'dit'  # 'sit' | 'dit'
  config.model.learn_sigma = True  # required by the DiT objective

  config.sample.sampler = 'ddpm'  # 'ddpm' | 'ddim'
  config.sample.num_steps = 250  # respaced steps ('250'); one model call per branch per step
  config.sample.cfg_scale = 1.65
  config.sample.guidance_low = 0.0
  config.sample.guidance_high = 1.0
  config.sample.guided_channels = 0  # all 4 channels
  config.sample.cond_group_size = 1
  config.sample.uncond_group_size = 4
  config.sample.images_per_group = 4
  config.sample.group_stage_fraction = 1.0
  return config
