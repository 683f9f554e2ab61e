"""The sample job: groups of same-class images generated jointly, as a grid."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from groupdiff_jax import checkpoint, samplers
from groupdiff_jax.models.dit import model_from_config


def group_labels(num_groups, images_per_group, num_classes):
  """[G*N] labels: group g is class g mod num_classes, members contiguous."""
  return jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32) % num_classes, images_per_group)


def generate(model, params, rng, sample_config, model_config):
  """Images [G*N, H, W, C] (model space) for G groups of N same-class images."""
  per_group = sample_config.images_per_group
  for size in (sample_config.cond_group_size, sample_config.uncond_group_size):
    if per_group % size:
      raise ValueError(f'sample.images_per_group={per_group} must be a multiple of the branch group size {size}, '
                       'so that a branch never groups images of different classes.')
  if max(sample_config.cond_group_size, sample_config.uncond_group_size) > model_config.max_group_size > 0:
    raise ValueError(f'Sampling group sizes exceed model.max_group_size={model_config.max_group_size}.')
  labels = group_labels(sample_config.num_groups, per_group, model_config.num_classes)
  noise_rng, step_rng = jax.random.split(rng)
  shape = (labels.shape[0], model_config.input_size, model_config.input_size, model_config.in_channels)
  guidance = samplers.guidance_from_config(sample_config)

  @jax.jit
  def run(params, noise, key):
    velocity = samplers.make_velocity_fn(model.apply, params, labels, guidance, null_class=model_config.num_classes,
                                         max_group_size=model_config.max_group_size,
                                         data_channels=model_config.in_channels)
    return samplers.integrate_ode(velocity, noise, key, sample_config.num_steps, sample_config.sampler)

  return run(params, jax.random.normal(noise_rng, shape), step_rng)


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
  images = generate(model, params, jax.random.PRNGKey(config.seed + 1), config.sample, config.model)
  images = to_uint8(images)
  os.makedirs(workdir, exist_ok=True)
  np.save(os.path.join(workdir, 'samples.npy'), images)
  path = save_grid(images, config.sample.images_per_group, os.path.join(workdir, 'samples.png'))
  with open(os.path.join(workdir, 'samples.json'), 'w') as f:
    json.dump({'settings': config.sample.to_dict(), 'variant': config.model.variant,
               'nfe_per_branch': samplers.number_of_function_evaluations(config.sample.num_steps,
                                                                        config.sample.sampler)}, f, indent=2)
  print(f'Sample grid (each row one jointly generated group): {os.path.abspath(path)}')
  return path
