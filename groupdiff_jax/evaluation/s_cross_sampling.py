"""S_cross measured during sampling: which branch, which stages, the report.

Used by the sample job (sample_job.py, `sample.s_cross=True`). The final
samples of the first groups are noised back to each stage of
`sample.s_cross_stages` by the forward process (not the sampler's own x_t),
and the branch that attends over a group runs one forward pass per stage
under s_cross_probe.member_masses. Definition: evaluation/s_cross.py (our
reading of the paper; the official code does not compute S_cross).
"""

import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax import diffusion as gd
from groupdiff_jax import errors
from groupdiff_jax import transport as transport_lib
from groupdiff_jax.evaluation import s_cross_probe
from groupdiff_jax.models.embeddings import draw_sample_ids


def s_cross_branch(sample_config):
  """(name, group size, unconditional) of the branch whose attention over its group is measured.

  The unconditional branch when CFG runs it and it is grouped (GroupDiff-l:
  uncond_group_size 4), else a grouped conditional branch (GroupDiff-f
  without CFG); a clear error when no branch attends over a group.
  """
  s = sample_config
  if s.cfg_scale != 1.0 and s.uncond_group_size > 1:
    return 'unconditional', s.uncond_group_size, True
  if s.cond_group_size > 1:
    return 'conditional', s.cond_group_size, False
  raise errors.ConfigError(f'sample.s_cross=True measures how members attend to each other, but no branch attends '
                           f'over a group here (sample.cond_group_size={s.cond_group_size}, sample.uncond_group_size='
                           f'{s.uncond_group_size}, sample.cfg_scale={s.cfg_scale}): set a group size > 1 for a branch '
                           'that runs (e.g. --config.sample.uncond_group_size=4 with cfg_scale != 1), or drop '
                           'sample.s_cross.')


def group_attention_at(stage, group_stage_fraction):
  """Whether the sampler uses group attention at `stage` (fraction of the trajectory done from the noise end)."""
  return group_stage_fraction >= 1.0 or stage < group_stage_fraction


def noised(x0, stage, rng, model_config):
  """(x_t [B, H, W, C], model time t [B]) of clean x0 [B, H, W, C] at `stage` (0 = noise end, 1 = data).

  SiT: t = t0 + stage * (t1 - t0) on the sampling interval, x_t from the
  model's path; DiT: original timestep k = round((1 - stage) * (T - 1)),
  x_t = q_sample(x0, k).
  """
  noise = jax.random.normal(rng, x0.shape, jnp.float32)
  batch = x0.shape[0]
  if model_config.get('objective', 'sit') == 'dit':
    t = jnp.full((batch,), round((1.0 - stage) * (gd.NUM_TIMESTEPS - 1)), jnp.int32)
    return gd.q_sample(x0, t, noise, gd.create_schedule('')), t
  transport = transport_lib.transport_from_config(model_config)
  t0, t1 = transport_lib.time_interval(transport, sampling=True)
  t = jnp.full((batch,), t0 + stage * (t1 - t0), jnp.float32)
  return transport_lib.interpolate(x0, noise, t, transport.path)[0], t


def s_cross_masses(model, params, x0, labels, rng, sample_config, model_config):
  """Member masses of the measured branch at every stage of sample.s_cross_stages.

  x0: [B, H, W, C] final samples (model space) of whole groups, labels
  int32 [B] their classes (the conditional branch's labels). At each
  stage the groups are noised back to that point of the trajectory
  (`noised`: the forward process from the sample, not the sampler's own
  state) and one forward pass of the branch (its labels, group size and
  fresh sample ids) runs under s_cross_probe.member_masses. Stages where the
  sampler has group attention off are skipped.

  Returns:
    (layers int32 [L], mass float32 [S_on, L, B/n, n, n]) with n the
    branch's group size and S_on the stages with group attention.
  """
  _, group_size, unconditional = s_cross_branch(sample_config)
  labels = jnp.full((x0.shape[0],), model_config.num_classes, jnp.int32) if unconditional else jnp.asarray(labels)
  layers, masses = None, []
  x0 = jnp.asarray(x0, jnp.float32)
  for index, stage in enumerate(sample_config.s_cross_stages):
    if not group_attention_at(stage, sample_config.group_stage_fraction):
      continue
    noise_rng, id_rng = jax.random.split(jax.random.fold_in(rng, index))
    x_t, t = noised(x0, stage, noise_rng, model_config)
    ids = None
    if model_config.max_group_size > 0:
      ids = draw_sample_ids(id_rng, x0.shape[0] // group_size, group_size, model_config.max_group_size,
                            sample_config.fixed_sample_ids)
    stage_layers, mass = s_cross_probe.member_masses(model, params, x_t, t, labels, ids, group_size=group_size)
    layers = np.asarray(stage_layers)
    masses.append(np.asarray(mass))
  return layers, np.stack(masses)


def s_cross_report(layers, mass, sample_config):
  """The JSON-ready S_cross summary of masses [S_on, L, G, n, n] (s_cross_probe.summarize).

  per_layer {layer: S_cross}, per_stage {stage: S_cross} (stages with group
  attention), per_stage_layer {stage: {layer: S_cross}}, mean (masses
  averaged over stages and layers, then scored), as fractions; mean_percent.
  """
  name, group_size, _ = s_cross_branch(sample_config)
  stages = [float(s) for s in sample_config.s_cross_stages]
  on = [s for s in stages if group_attention_at(s, sample_config.group_stage_fraction)]
  report = {
      'definition': 'METHOD.md section 4 (our reading): S_cross = mean_i (max_j a_ij - mean_j a_ij), a_ij the '
                    'attention mass of member i on member j != i renormalised over j; 0..1 (x100 for %)',
      'method': 'final samples of the first groups noised back to each stage by the forward process, one probe '
                'forward pass of the branch per stage (evaluation/s_cross_probe.py)',
      'branch': name, 'group_size': group_size,
      'num_groups': int(mass.shape[2]), 'stages': stages, 'stages_with_group_attention': on,
      'layers': [int(l) for l in layers],
  }
  if len(layers) == 0:
    report.update(note='no layer attends over a group (model.group_layers)', per_layer={}, per_stage={},
                  per_stage_layer={}, mean=None, mean_percent=None)
    return report
  summary = {k: np.asarray(v).tolist() for k, v in s_cross_probe.summarize(jnp.asarray(mass)).items()}
  layer_names, stage_names = [str(int(l)) for l in layers], [str(s) for s in on]
  report.update(
      per_layer=dict(zip(layer_names, summary['per_layer'])),
      per_stage=dict(zip(stage_names, summary['per_stage'])),
      per_stage_layer={stage: dict(zip(layer_names, row))
                       for stage, row in zip(stage_names, summary['per_stage_layer'])},
      mean=summary['mean'], mean_percent=100.0 * summary['mean'])
  return report
