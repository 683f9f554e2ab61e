"""Sampling a batch of groups: same-class images generated jointly, decoded, and grids of them.

What the sample job (sample_job.py), the training monitor (train_monitor.py)
and the compile job (compile_job.py) share: which class each group has
(`group_labels`), one jitted sampler for a batch of groups (`make_sampler`,
both objectives, optionally sharded over a mesh by whole groups;
`chunk_sampler` caches it per config), the mesh of this process's devices
that holds whole groups (`local_mesh`), the SD-VAE decoder of latent models
(`make_decoder`), the uint8 conversion and the PNG grid. The ODE/SDE/DDPM
integrators themselves are in samplers.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from groupdiff_jax import diffusion as gd
from groupdiff_jax import errors
from groupdiff_jax import sample_chunks, samplers, sharding
from groupdiff_jax.encoders import vae as vae_lib
from groupdiff_jax import transport as transport_lib

IMAGE_CHANNELS = (1, 3)  # model.in_channels of image-space models; anything else is a VAE latent


def group_labels(num_groups, images_per_group, num_classes):
  """[G*N] labels: group g is class g mod num_classes, members contiguous."""
  return jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32) % num_classes, images_per_group)


def timestep_respacing(sample_config):
  """DiT: the respacing of the sampling schedule, e.g. '250' (DiT's sample.py
  uses str(num_sampling_steps) for both DDPM and DDIM); an explicit
  `sample.timestep_respacing` (e.g. 'ddim50') wins."""
  return sample_config.timestep_respacing or str(sample_config.num_steps)


def check_sampler(objective, sampler):
  if objective not in samplers.SAMPLERS_BY_OBJECTIVE:
    raise errors.ConfigError(f"Unknown model.objective={objective!r}; use 'sit' or 'dit'.")
  allowed = samplers.SAMPLERS_BY_OBJECTIVE[objective]
  if sampler not in allowed:
    raise errors.ConfigError(f'sample.sampler={sampler!r} does not fit model.objective={objective!r}; choose one of '
                             f'{allowed} (e.g. --config.sample.sampler={allowed[0]}).')


def dit_schedule(sample_config):
  """DiT's respaced sampling schedule of `sample_config`; a ConfigError naming the field it cannot take."""
  respacing = timestep_respacing(sample_config)
  try:
    return gd.create_schedule(respacing)
  except ValueError as error:  # space_timesteps: too many steps, no integer stride, not a number
    field = ('sample.timestep_respacing' if sample_config.timestep_respacing else 'sample.num_steps')
    raise errors.ConfigError(f'{field}: DiT cannot respace its {gd.NUM_TIMESTEPS} steps as {respacing!r} ({error}); '
                             f"use e.g. sample.num_steps=250, or sample.timestep_respacing='ddim50'.") from None


def generate(model, params, rng, sample_config, model_config):
  """Images [G*N, H, W, C] (model space) for G groups of N same-class images."""
  return generate_with_nfe(model, params, rng, sample_config, model_config)[0]


def check_group_sizes(sample_config, model_config):
  """Raise unless both branches' group sizes fit the groups and the model."""
  per_group = sample_config.images_per_group
  sizes = dict(cond_group_size=sample_config.cond_group_size, uncond_group_size=sample_config.uncond_group_size)
  if per_group < 1:
    raise errors.ConfigError(f'sample.images_per_group={per_group} must be positive.')
  for name, size in sizes.items():
    if size < 1:
      raise errors.ConfigError(f'sample.{name}={size} must be positive (1: no group attention in that branch).')
    if per_group % size:
      raise errors.ConfigError(f'sample.images_per_group={per_group} must be a multiple of sample.{name}={size}, '
                               'so that a branch never groups images of different classes.')
  too_large = {name: size for name, size in sizes.items() if size > model_config.max_group_size > 0}
  if too_large:
    raise errors.ConfigError(
        'Sampling group sizes ' + ', '.join(f'sample.{n}={s}' for n, s in too_large.items()) + ' exceed '
        f'model.max_group_size={model_config.max_group_size} (the sample embedding\'s rows): lower them or sample '
        'a model trained with a larger max_group_size.')


def make_sampler(model, sample_config, model_config, mesh=None, mesh_config=None):
  """A jitted run(params, labels, rng) -> (x [B, H, W, C] model space, NFE per branch).

  labels: int32 [B], whole groups of sample.images_per_group, members
  contiguous. rng is split into (noise, step, sample-id) keys; the noise
  x_T [B, H, W, C] is drawn inside. Dispatches on model.objective. 'sit':
  sample.sampler 'euler' | 'heun' (fixed-step ODE), 'sde' (Euler-Maruyama,
  SiT's last step) or 'dopri5' (adaptive ODE; its NFE is the one it used),
  with the model's path and prediction (transport.py). 'dit': DiT's DDPM
  ancestral or DDIM sampler ('ddpm' | 'ddim') over sample.num_steps respaced
  steps. All of them use samplers.make_guided_model_fn for CFG and groups.

  mesh: None runs on the default device; a sharding.make_mesh mesh splits
  the batch over its (data, fsdp) axes (params replicated): the caller makes
  B / images_per_group a multiple of the mesh size, so that every device
  holds whole groups, or, with a `group` axis, part of one group (a group
  split over devices; mesh_config: the config's `mesh` section, for
  mesh.group_collective). The values do not depend on the mesh (the keys
  and shapes are those of the whole batch).
  """
  objective = model_config.objective
  check_sampler(objective, sample_config.sampler)
  check_group_sizes(sample_config, model_config)
  guidance = samplers.guidance_from_config(sample_config)
  common = dict(null_class=model_config.num_classes, max_group_size=model_config.max_group_size,
                data_channels=model_config.in_channels)
  method, num_steps = sample_config.sampler, sample_config.num_steps
  side, channels = model_config.input_size, model_config.in_channels
  if objective == 'dit' and not model_config.learn_sigma:
    raise errors.ConfigError('model.objective=dit needs model.learn_sigma=True (DiT\'s learned-range variance): '
                             'pass --config.model.learn_sigma=True.')
  schedule = dit_schedule(sample_config) if objective == 'dit' else None
  transport = transport_lib.transport_from_config(model_config)
  batch = None if mesh is None else sharding.batch_sharding(mesh)
  constrain = (lambda x: x) if batch is None else (lambda x: jax.lax.with_sharding_constraint(x, batch))

  def run(params, labels, rng):
    noise_rng, step_rng, id_rng = jax.random.split(rng, 3)
    noise = constrain(jax.random.normal(noise_rng, (labels.shape[0], side, side, channels)))  # x_T [B, H, W, C]
    if objective == 'dit':
      denoise = samplers.make_denoise_fn(model.apply, params, labels, guidance, id_rng, **common)
      return samplers.sample_diffusion(denoise, noise, step_rng, schedule, method), schedule.num_timesteps
    if method == 'sde':
      predict = samplers.make_prediction_fn(model.apply, params, labels, guidance, **common)
      last_step = sample_config.sde_last_step
      last_step = None if last_step in (None, '', 'none', 'None') else last_step
      images = samplers.integrate_sde(
          predict, noise, step_rng, num_steps, transport, sample_config.sde_diffusion_form,
          sample_config.sde_diffusion_norm, last_step, sample_config.sde_last_step_size)
      return images, num_steps if last_step is not None else num_steps - 1
    velocity = samplers.make_velocity_fn(model.apply, params, labels, guidance, transport=transport, **common)
    if method == 'dopri5':
      return samplers.integrate_adaptive(velocity, noise, step_rng, transport, sample_config.ode_atol,
                                         sample_config.ode_rtol)
    t0, t1 = transport_lib.time_interval(transport, sampling=True)
    images = samplers.integrate_ode(velocity, noise, step_rng, num_steps, method, t0, t1)
    return images, samplers.number_of_function_evaluations(num_steps, method)

  if mesh is None:
    return jax.jit(run)
  replicated = sharding.replicated(mesh)
  jitted = jax.jit(run, in_shardings=(replicated, batch, replicated), out_shardings=(batch, replicated))

  def run_on_mesh(params, labels, rng):
    with sharding.use_mesh(mesh, mesh_config):  # Pallas attention per device; groups split over `group`
      return jitted(params, labels, rng)

  def lower(params, labels, rng):
    """The same program lowered (AOT: compile_job.py); inputs may be abstract."""
    with sharding.use_mesh(mesh, mesh_config):
      return jitted.lower(params, labels, rng)

  run_on_mesh.lower = lower
  return run_on_mesh


def generate_with_nfe(model, params, rng, sample_config, model_config):
  """(images [G*N, H, W, C] model space, model evaluations per branch) for
  G = sample.num_groups groups of N = sample.images_per_group, in one batch
  on the default device (make_sampler says what runs)."""
  labels = group_labels(sample_config.num_groups, sample_config.images_per_group, model_config.num_classes)
  images, nfe = make_sampler(model, sample_config, model_config)(params, labels, rng)
  return images, int(nfe)


def quantize(images):
  """[-1, 1] floats -> uint8 (jnp; jit-friendly): round((x + 1) * 127.5), clipped,
  as DiT's sample.py (clamp(127.5 x + 128, 0, 255) then a truncating cast)."""
  return jnp.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(jnp.uint8)


def to_uint8(images):
  """[-1, 1] floats -> uint8, greyscale kept as one channel."""
  return np.asarray(quantize(jnp.asarray(images)))


def grid_scale(image_side, target_side=64):
  """Nearest-neighbour upscaling that shows small images at about target_side px (16 px -> 4x; 256 px -> 1x)."""
  return max(1, target_side // image_side)


def grid_array(images, images_per_row, scale=4):
  """uint8 [B, H, W, C] -> one uint8 [rows * (H + 1) + 1, cols * (W + 1) + 1, C] picture (times `scale`), rows of
  `images_per_row` on a white background."""
  count, height, width, channels = images.shape
  rows = count // images_per_row
  pad = 1
  grid = np.full((rows * (height + pad) + pad, images_per_row * (width + pad) + pad, channels), 255, np.uint8)
  for i, image in enumerate(images[:rows * images_per_row]):
    r, c = divmod(i, images_per_row)
    grid[pad + r * (height + pad):pad + r * (height + pad) + height,
         pad + c * (width + pad):pad + c * (width + pad) + width] = image
  return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def save_grid(images, images_per_row, path, scale=4):
  """Write uint8 [B, H, W, C] as a PNG grid whose rows hold `images_per_row`, upscaled `scale` times."""
  from groupdiff_jax import storage  # pylint: disable=g-import-not-at-top
  grid = grid_array(images, images_per_row, scale)
  storage.save_png(path, grid[..., 0] if grid.shape[-1] == 1 else grid)
  return path


def is_latent(model_config):
  """Whether the model samples SD-VAE latents (decoded by `make_decoder`) rather than images."""
  return model_config.in_channels not in IMAGE_CHANNELS


# --- Devices and parameters ---------------------------------------------------
def local_mesh(groups_per_chunk, devices=None):
  """A (data, fsdp) = (D, 1) mesh of this process's devices; D the largest count dividing groups_per_chunk."""
  devices = list(jax.local_devices() if devices is None else devices)
  count = math.gcd(groups_per_chunk, len(devices))
  if count < len(devices):
    logging.warning('%d groups per chunk do not split evenly over %d devices: using %d of them; make '
                    'sample.groups_per_batch a multiple of %d to use all.', groups_per_chunk, len(devices), count,
                    len(devices))
  return sharding.make_mesh(devices=devices[:count])


def host_local(tree):
  """Every leaf as a NumPy array on this host (leaves spread over several hosts are gathered)."""
  def one(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)
  return jax.tree.map(one, tree)


@functools.lru_cache(maxsize=4)
def _cached_sampler(model, sample_config, model_config, mesh):
  return make_sampler(model, sample_config, model_config, mesh)


def chunk_sampler(model, config, mesh):
  """make_sampler for the config, compiled once per (model, generation settings, mesh) in a process
  (a demo that trains then samples, resumed parts of a job, tests)."""
  generation = {k: v for k, v in config.sample.to_dict().items() if k not in sample_chunks.OUTPUT_ONLY_FIELDS}
  return _cached_sampler(model, ml_collections.FrozenConfigDict(generation),
                         ml_collections.FrozenConfigDict(config.model.to_dict()), mesh)


# --- VAE decoding ---------------------------------------------------------------
def make_decoder(vae_params, vae_config, mesh, batch_size):
  """decode(latents [B, h, w, c] scaled as the model sees them) -> uint8 NumPy [B, f*h, f*w, 3].

  Decodes `batch_size` latents per call (rounded up to a multiple of the
  mesh's devices and split over them; the last call is zero-padded), in
  float32 (FID is sensitive to the decode dtype).
  """
  vae = vae_lib.AutoencoderKL(vae_config)
  batch_size = -(-max(batch_size, 1) // mesh.size) * mesh.size
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  params = jax.device_put(vae_params, replicated)
  def decode_and_check(p, z):
    images = vae_lib.images_from_latents(vae, p, z)  # [B, H, W, 3] float
    return quantize(images), jnp.isfinite(images).all(axis=(1, 2, 3))

  run = jax.jit(decode_and_check, in_shardings=(replicated, batch), out_shardings=(batch, batch))

  def decode(latents):
    latents = np.asarray(latents, np.float32)
    parts = []
    for start in range(0, len(latents), batch_size):
      part = latents[start:start + batch_size]
      count = len(part)
      part = np.concatenate([part, np.zeros((batch_size - count,) + part.shape[1:], part.dtype)])
      images, finite = run(params, part)
      if not np.asarray(finite)[:count].all():
        bad = start + int(np.argmin(np.asarray(finite)[:count]))
        raise NonfiniteSamplesError(bad)
      parts.append(np.asarray(images)[:count])
    return np.concatenate(parts)

  return decode


class NonfiniteSamplesError(FloatingPointError):
  """A decoded image holds NaN/inf; args[0] is its index in the chunk (sample_and_save names chunk and group)."""
