"""DiT-B/2 + GroupDiff-l-4 on ImageNet 256 latents, the recipe of dit_xl.py.

  python -m groupdiff_jax.main --config=configs/dit_b.py --workdir=DIR

The same objective, training and sampling settings as configs/dit_xl.py
(official GroupDiff-l-4 recipe; DDPM 250 steps, CFG 1.65 on all channels,
interval [0, 1], conditional group 1, unconditional group 4) at DiT-B/2
size (12 blocks, width 768, 12 heads; ~130M parameters, ~23 GFLOPs per
forward at 256 px), for ablations that do not need XL.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.variant = 'DiT-B/2'
  config.model.objective = 'dit'  # 'sit' | 'dit'
  config.model.learn_sigma = True  # required by the DiT objective
  config.model.max_group_size = 4

  config.train.group_size = 4
  config.train.group_ratio = 0.1
  config.train.timestep_jitter = 0.0

  config.data.name = 'imagenet_latents'

  config.sample.sampler = 'ddpm'
  config.sample.num_steps = 250
  config.sample.cfg_scale = 1.65
  config.sample.guidance_low = 0.0
  config.sample.guidance_high = 1.0
  config.sample.guided_channels = 0
  config.sample.cond_group_size = 1
  config.sample.uncond_group_size = 4
  config.sample.images_per_group = 4
  config.sample.group_stage_fraction = 1.0
  return config
