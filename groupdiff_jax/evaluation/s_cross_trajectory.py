"""S_cross on the sampler's own trajectory (GroupDiff-l: the unconditional group branch).

evaluation/s_cross_sampling.py noises the *final* samples back to a few
stages by the forward process. Here a fixed-step SiT ODE sampler (euler |
heun, with CFG and groups exactly as samplers.make_velocity_fn) runs one
step per jitted call, and before every step at which the guided model runs
the unconditional branch with group attention, that branch's own inputs go
through s_cross_probe.member_masses:

  x_t     the state the sampler holds at the step (its first P images),
  t       the step's time,
  y       the null class,
  ids     the sample ids the branch draws from the step's key
          (samplers.branch_rngs / branch_sample_ids: the functions
          make_guided_model_fn itself calls),

so the masses are those of the forward pass the sampler used (Heun: its
predictor evaluation at x_t; the corrector's is not probed). Whether a step
runs that branch grouped is decided by samplers.guidance_applies and
samplers.group_attention_on on the same float32 time.

`trajectory_report` turns the per-step masses into S_cross per step, per
stage, per layer and overall (METHOD.md section 4, our reading:
evaluation/s_cross.py) and into what the attention does besides: the mass a
member keeps on its own tokens and the histogram of a_ij.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax import errors, samplers
from groupdiff_jax import transport as transport_lib
from groupdiff_jax.evaluation import s_cross, s_cross_probe

SHARE_HISTOGRAM_BINS = 20  # equal bins of a_ij over [0, 1]


def make_trajectory_sampler(model, model_config, sample_config):
  """sample(params, noise [B,H,W,C], labels [B], key, probe_images) -> (x1, probe record).

  The record: {'steps_t': [K] step times, 'probed': [K] bool (the step ran
  the unconditional branch with group attention), 'layers': block indices
  covered (None when nothing was probed), 'masses': float32
  [K_probed, layers, G, N, N] member masses of the first `probe_images`
  images (whole groups of N = sample.uncond_group_size)}. probe_images 0
  probes nothing. Step k uses key fold_in(key, k).
  """
  s = sample_config
  if model_config.get('objective', 'sit') != 'sit':
    raise errors.ConfigError(f"The trajectory probe runs the SiT ODE sampler; model.objective="
                             f"{model_config.objective!r} (use evaluation/s_cross_sampling.py for DiT).")
  if s.sampler not in samplers.ODE_SAMPLERS:
    raise errors.ConfigError(f'The trajectory probe integrates a fixed-step ODE; sample.sampler={s.sampler!r} is '
                             f'not one of {samplers.ODE_SAMPLERS}.')
  guidance = samplers.guidance_from_config(s)
  transport = transport_lib.transport_from_config(model_config)
  t_start, t_end = transport_lib.time_interval(transport, sampling=True)
  group_size, null_class = s.uncond_group_size, model_config.num_classes
  dt = (t_end - t_start) / s.num_steps

  @jax.jit
  def step(params, x, labels, key, t):  # t traced: one compile for every step
    velocity = samplers.make_velocity_fn(model.apply, params, labels, guidance, transport=transport,
                                         null_class=null_class, max_group_size=model_config.max_group_size,
                                         data_channels=model_config.in_channels)
    noise_level = 1.0 - t  # as make_prediction_fn
    grouped = (samplers.guidance_applies(noise_level, guidance) & samplers.group_attention_on(
        noise_level, guidance.group_stage_fraction) & (guidance.cfg_scale != 1.0) & (group_size > 1))
    # integrate_ode's single step evaluates the velocity with key fold_in(key, 0).
    return samplers.integrate_ode(velocity, x, key, 1, s.sampler, t, t + dt), grouped

  @functools.partial(jax.jit, static_argnames=('num_images',))
  def probe(params, x, key, t, num_images):
    _, uncond_rng = samplers.branch_rngs(jax.random.fold_in(key, 0))  # the key integrate_ode gave the velocity
    ids = samplers.branch_sample_ids(uncond_rng, num_images, group_size, model_config.max_group_size,
                                     guidance.fixed_sample_ids)
    ids = None if ids is None else ids[:x.shape[0]]
    return s_cross_probe.member_masses(model, params, x, jnp.full((x.shape[0],), t), jnp.full(
        (x.shape[0],), null_class), ids, group_size=group_size)

  def sample(params, noise, labels, key, probe_images=0):
    probe_images = probe_images // group_size * group_size if group_size > 1 else 0
    x, times, probed, masses, layers = noise, [], [], [], None
    for k in range(s.num_steps):
      t = jnp.float32(t_start + k * dt)
      step_key = jax.random.fold_in(key, k)
      x_next, grouped = step(params, x, labels, step_key, t)
      grouped = bool(grouped) and probe_images > 0
      if grouped:
        layers, mass = probe(params, x[:probe_images], step_key, t, x.shape[0])
        masses.append(np.asarray(mass))  # [layers, G, N, N]
      times.append(float(t))
      probed.append(grouped)
      x = x_next
    record = {'steps_t': times, 'probed': probed, 'layers': None if layers is None else np.asarray(layers).tolist(),
              'masses': np.stack(masses) if masses else np.zeros((0,), np.float32)}
    return x, record

  return sample


def stage_of(t, stage_starts):
  """Index of the stage [stage_starts[i], stage_starts[i + 1]) holding time t (SiT: 0 = noise), compared in
  float32 as the sampler's times; a time before the first start belongs to stage 0."""
  t = np.float32(t)
  return max([0] + [i for i, start in enumerate(stage_starts) if np.float32(start) <= t])


def trajectory_report(record, stage_starts, group_size):
  """JSON-ready summary of a `make_trajectory_sampler` record; S_cross values in percent.

  Keys: method; group_size; steps_t; probed; layers; num_groups; mean_percent
  (masses averaged over probed steps and layers, then scored); per_step_percent
  [K] (None where not probed); per_stage_percent {stage start: value or
  None}; per_layer_percent {layer: value}; per_stage_layer_percent; the
  attention itself: self_mass_fraction (mean over probed steps, layers,
  groups and members of the mass a member keeps on its own tokens; 1/N if
  it attended uniformly over the group's tokens), its per_layer and
  per_stage values, share_histogram {edges, counts} of every a_ij (j != i,
  each probed step, layer, group and member) and uniform_share 1/(N-1).
  """
  masses = np.asarray(record['masses'], np.float32)  # [K_probed, layers, G, N, N]
  stage_names = [f'{start:g}' for start in stage_starts]
  report = {
      'method': "the sampler's own x_t, time, null labels and sample ids at every step that runs the unconditional "
                'group branch (evaluation/s_cross_trajectory.py)',
      'group_size': group_size, 'steps_t': record['steps_t'], 'probed': record['probed'],
      'layers': record['layers'], 'num_groups': int(masses.shape[2]) if masses.ndim == 5 else 0,
      'stage_starts': list(stage_starts), 'uniform_share': 1.0 / (group_size - 1) if group_size > 1 else None,
  }
  if masses.ndim != 5 or masses.shape[0] == 0 or masses.shape[1] == 0:
    report.update(mean_percent=None, per_step_percent=[None] * len(record['steps_t']),
                  per_stage_percent={name: None for name in stage_names}, per_layer_percent={},
                  per_stage_layer_percent={}, self_mass_fraction=None, self_mass_fraction_per_layer={},
                  self_mass_fraction_per_stage={name: None for name in stage_names}, share_histogram=None)
    return report
  score = lambda m: 100.0 * float(np.asarray(s_cross.s_cross_from_mass(jnp.asarray(m))).mean())  # mean over groups
  diagonal = np.diagonal(masses, axis1=-2, axis2=-1)  # [K_probed, layers, G, N]
  layer_names = [str(layer) for layer in record['layers']]
  probed_t = [t for t, p in zip(record['steps_t'], record['probed']) if p]
  stage_index = np.asarray([stage_of(t, stage_starts) for t in probed_t])
  per_stage, per_stage_layer, self_per_stage = {}, {}, {}
  for i, name in enumerate(stage_names):
    mine = masses[stage_index == i]
    per_stage[name] = score(mine.mean((0, 1))) if len(mine) else None
    per_stage_layer[name] = ({layer: score(mine[:, j].mean(0)) for j, layer in enumerate(layer_names)}
                             if len(mine) else {})
    self_per_stage[name] = float(diagonal[stage_index == i].mean()) if len(mine) else None
  per_step, probed_index = [], 0
  for probed in record['probed']:
    per_step.append(score(masses[probed_index].mean(0)) if probed else None)
    probed_index += int(probed)
  shares = np.asarray(s_cross.member_shares(jnp.asarray(masses)))  # [K_probed, layers, G, N, N]
  off_diagonal = shares[..., ~np.eye(group_size, dtype=bool)]  # [K_probed, layers, G, N * (N - 1)]
  counts, edges = np.histogram(off_diagonal, bins=SHARE_HISTOGRAM_BINS, range=(0.0, 1.0))
  report.update(
      mean_percent=score(masses.mean((0, 1))), per_step_percent=per_step, per_stage_percent=per_stage,
      per_layer_percent={layer: score(masses[:, j].mean(0)) for j, layer in enumerate(layer_names)},
      per_stage_layer_percent=per_stage_layer, self_mass_fraction=float(diagonal.mean()),
      self_mass_fraction_per_layer={layer: float(diagonal[:, j].mean()) for j, layer in enumerate(layer_names)},
      self_mass_fraction_per_stage=self_per_stage,
      share_histogram={'edges': edges.tolist(), 'counts': counts.tolist()})
  return report
