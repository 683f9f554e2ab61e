"""Timestep respacing (DiT `diffusion/respace.py`) and schedule creation.

A respaced schedule keeps a subset of the original steps. Its betas are
chosen so that its alphas_cumprod equal the original ones at the kept steps
(beta_i = 1 - abar[k_i] / abar[k_{i-1}]), and its `timestep_map` sends each
respaced index back to the original timestep, which is what the model sees
(DiT's `_WrappedModel`).
"""

from typing import Sequence, Union

import numpy as np

from groupdiff_jax.diffusion import gaussian_diffusion


def space_timesteps(num_timesteps, section_counts: Union[str, int, Sequence[int]]):
  """Original timesteps to keep, sorted ascending: tuple of ints.

  section_counts: "250" (250 evenly spaced steps, first and last kept),
  "10,15,20" (that many steps from each of three equal sections), an int
  or a list of ints (the same), or "ddimN" (the DDIM paper's fixed integer
  stride: range(0, T, stride) with exactly N elements, so the last step
  T-1 is generally not kept).
  """
  if isinstance(section_counts, str) and section_counts.startswith('ddim'):
    desired_count = int(section_counts[len('ddim'):])
    for stride in range(1, num_timesteps):
      if len(range(0, num_timesteps, stride)) == desired_count:
        return tuple(range(0, num_timesteps, stride))
    raise ValueError(f'cannot take exactly {desired_count} of {num_timesteps} steps with an integer stride')
  if isinstance(section_counts, str):
    section_counts = [int(count) for count in section_counts.split(',')]
  elif isinstance(section_counts, int):
    section_counts = [section_counts]
  size_per_section, extra = divmod(num_timesteps, len(section_counts))
  start, kept = 0, []
  for i, count in enumerate(section_counts):
    size = size_per_section + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f'cannot divide a section of {size} steps into {count}')
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    kept += [start + round(j * stride) for j in range(count)]
    start += size
  return tuple(sorted(set(kept)))


def respaced_betas(betas, kept_timesteps):
  """Betas of the respaced process and its timestep map.

  betas: float64 [T]; kept_timesteps: ascending original steps [S].
  Returns (float64 [S] betas, int64 [S] timestep_map).
  """
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
  timestep_map = np.asarray(sorted(kept_timesteps), dtype=np.int64)
  kept_cumprod = alphas_cumprod[timestep_map]
  previous_cumprod = np.append(1.0, kept_cumprod[:-1])
  return 1.0 - kept_cumprod / previous_cumprod, timestep_map


def create_schedule(timestep_respacing='', num_timesteps=gaussian_diffusion.NUM_TIMESTEPS, noise_schedule='linear'):
  """DiT's `create_diffusion` defaults as a DiffusionSchedule.

  timestep_respacing: '' or None for all T steps (training); e.g. '250' or
  'ddim50' for sampling (see space_timesteps).
  """
  if noise_schedule != 'linear':
    raise ValueError(f'noise schedule {noise_schedule!r} is not supported: only DiT\'s default "linear".')
  betas = gaussian_diffusion.linear_beta_schedule(num_timesteps)
  if timestep_respacing is None or timestep_respacing == '':
    return gaussian_diffusion.make_schedule(betas)
  kept = space_timesteps(num_timesteps, timestep_respacing)
  new_betas, timestep_map = respaced_betas(betas, kept)
  return gaussian_diffusion.make_schedule(new_betas, timestep_map)
