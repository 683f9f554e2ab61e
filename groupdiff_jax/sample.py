"""The sample job: groups of same-class images generated jointly, as a grid."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from groupdiff_jax import checkpoint, samplers
from groupdiff_jax import diffusion as gd
from groupdiff_jax import transport as transport_lib
from groupdiff_jax.models.dit import model_from_config


def group_labels(num_groups, images_per_group, num_classes):
  """[G*N] labels: group g is class g mod num_classes, members contiguous."""
  return jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32) % num_classes, images_per_group)


def timestep_respacing(sample_config):
  """DiT: the respacing of the sampling schedule, e.g. '250' (DiT's sample.py
  uses str(num_sampling_steps) for both DDPM and DDIM); an explicit
  `sample.timestep_respacing` (e.g. 'ddim50') wins."""
  return sample_config.get('timestep_respacing') or str(sample_config.num_steps)


def check_sampler(objective, sampler):
  if objective not in samplers.SAMPLERS_BY_OBJECTIVE:
    raise ValueError(f"Unknown model.objective={objective!r}; use 'sit' or 'dit'.")
  allowed = samplers.SAMPLERS_BY_OBJECTIVE[objective]
  if sampler not in allowed:
    raise ValueError(f'sample.sampler={sampler!r} does not fit model.objective={objective!r}; choose one of '
                     f'{allowed} (e.g. --config.sample.sampler={allowed[0]}).')


def generate(model, params, rng, sample_config, model_config):
  """Images [G*N, H, W, C] (model space) for G groups of N same-class images."""
  return generate_with_nfe(model, params, rng, sample_config, model_config)[0]


def generate_with_nfe(model, params, rng, sample_config, model_config):
  """(images [G*N, H, W, C], model evaluations per branch) for G groups of N.

  Dispatches on model.objective. 'sit': sample.sampler 'euler' | 'heun'
  (fixed-step ODE), 'sde' (Euler-Maruyama, SiT's last step) or 'dopri5'
  (adaptive ODE; its NFE is the one it used), with the model's path and
  prediction (transport.py). 'dit': DiT's DDPM ancestral or DDIM sampler
  ('ddpm' | 'ddim') over sample.num_steps respaced steps. All of them use
  samplers.make_guided_model_fn for CFG and groups.
  """
  objective = model_config.get('objective', 'sit')
  check_sampler(objective, sample_config.sampler)
  per_group = sample_config.images_per_group
  for size in (sample_config.cond_group_size, sample_config.uncond_group_size):
    if per_group % size:
      raise ValueError(f'sample.images_per_group={per_group} must be a multiple of the branch group size {size}, '
                       'so that a branch never groups images of different classes.')
  if max(sample_config.cond_group_size, sample_config.uncond_group_size) > model_config.max_group_size > 0:
    raise ValueError(f'Sampling group sizes exceed model.max_group_size={model_config.max_group_size}.')
  labels = group_labels(sample_config.num_groups, per_group, model_config.num_classes)
  noise_rng, step_rng, id_rng = jax.random.split(rng, 3)
  shape = (labels.shape[0], model_config.input_size, model_config.input_size, model_config.in_channels)
  guidance = samplers.guidance_from_config(sample_config)
  common = dict(null_class=model_config.num_classes, max_group_size=model_config.max_group_size,
                data_channels=model_config.in_channels)
  method, num_steps = sample_config.sampler, sample_config.num_steps

  if objective == 'dit':
    if not model_config.learn_sigma:
      raise ValueError('model.objective=dit needs model.learn_sigma=True (DiT\'s learned-range variance).')
    schedule = gd.create_schedule(timestep_respacing(sample_config))

    @jax.jit
    def run(params, noise, key):
      denoise = samplers.make_denoise_fn(model.apply, params, labels, guidance, id_rng, **common)
      return samplers.sample_diffusion(denoise, noise, key, schedule, method), schedule.num_timesteps
  else:
    transport = transport_lib.transport_from_config(model_config)

    @jax.jit
    def run(params, noise, key):
      if method == 'sde':
        predict = samplers.make_prediction_fn(model.apply, params, labels, guidance, **common)
        last_step = sample_config.get('sde_last_step', 'Mean')
        last_step = None if last_step in (None, '', 'none', 'None') else last_step
        images = samplers.integrate_sde(
            predict, noise, key, num_steps, transport, sample_config.get('sde_diffusion_form', 'SBDM'),
            sample_config.get('sde_diffusion_norm', 1.0), last_step, sample_config.get('sde_last_step_size', 0.04))
        return images, num_steps if last_step is not None else num_steps - 1
      velocity = samplers.make_velocity_fn(model.apply, params, labels, guidance, transport=transport, **common)
      if method == 'dopri5':
        return samplers.integrate_adaptive(velocity, noise, key, transport, sample_config.get('ode_atol', 1e-6),
                                           sample_config.get('ode_rtol', 1e-3))
      t0, t1 = transport_lib.time_interval(transport, sampling=True)
      images = samplers.integrate_ode(velocity, noise, key, num_steps, method, t0, t1)
      return images, samplers.number_of_function_evaluations(num_steps, method)

  images, nfe = run(params, jax.random.normal(noise_rng, shape), step_rng)
  return images, int(nfe)


def to_uint8(images):
  """[-1, 1] floats -> uint8, greyscale kept as one channel."""
  return np.asarray(jnp.clip((images + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


def save_grid(images, images_per_row, path, scale=4):
  """Write uint8 [B, H, W, C] as a PNG grid whose rows hold `images_per_row`."""
  count, height, width, channels = images.shape
  rows = count // images_per_row
  pad = 1
  grid = np.full((rows * (height + pad) + pad, images_per_row * (width + pad) + pad, channels), 255, np.uint8)
  for i, image in enumerate(images[:rows * images_per_row]):
    r, c = divmod(i, images_per_row)
    grid[pad + r * (height + pad):pad + r * (height + pad) + height,
         pad + c * (width + pad):pad + c * (width + pad) + width] = image
  grid = grid[..., 0] if channels == 1 else grid
  picture = Image.fromarray(grid)
  picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
  picture.save(path)
  return path


def sample_and_save(config, workdir, params=None):
  """Generate `config.sample` groups and write samples.png / samples.npy.

  Without `params`, loads the latest checkpoint of workdir (EMA weights when
  sample.use_ema). Returns the PNG path.
  """
  if config.model.in_channels not in (1, 3):
    raise ValueError(f'model.in_channels={config.model.in_channels}: latents need the VAE decoder to become '
                     'images, which this sample job does not run yet; use an image-space config such as '
                     'configs/digits.py.')
  model = model_from_config(config.model)
  if params is None:
    params, step = checkpoint.load_params(workdir, config.sample.use_ema)
    print(f'Sampling from the checkpoint of step {step}.')
  images, nfe = generate_with_nfe(model, params, jax.random.PRNGKey(config.seed + 1), config.sample, config.model)
  images = to_uint8(images)
  os.makedirs(workdir, exist_ok=True)
  np.save(os.path.join(workdir, 'samples.npy'), images)
  path = save_grid(images, config.sample.images_per_group, os.path.join(workdir, 'samples.png'))
  with open(os.path.join(workdir, 'samples.json'), 'w') as f:
    json.dump({'settings': config.sample.to_dict(), 'variant': config.model.variant,
               'objective': config.model.get('objective', 'sit'), 'nfe_per_branch': nfe}, f, indent=2)
  print(f'Sample grid (each row one jointly generated group): {os.path.abspath(path)}')
  return path
