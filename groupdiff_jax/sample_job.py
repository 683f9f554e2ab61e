"""The sample job: N images in groups, in chunks, over devices and hosts; resumable.

  python -m groupdiff_jax.main --config=configs/eval_gdiff_dit_xl.py --workdir=DIR --mode=sample \
      --config.sample.vae_path=/weights/sd-vae-ft-mse/diffusion_pytorch_model.safetensors

Plan. `sample.num_groups` groups of `sample.images_per_group` same-class
images (group g has class g mod num_classes: 12,500 groups of 4 are 50
images per ImageNet class) are generated C = min(sample.groups_per_batch,
num_groups) groups at a time. Chunk c holds groups [c*C, (c+1)*C); the last
one may hold fewer: its empty slots are generated (with the next classes)
and dropped, so that every chunk has the same shape and one compilation.

Randomness. Chunk c draws everything (x_T, sample ids, SDE/DDPM noise) from
fold_in(PRNGKey(seed + 1), c), and the S_cross probe noise from
fold_in(that key, S_CROSS_STREAM). What a chunk holds is therefore a
function of the config and the checkpoint, not of how many hosts or devices
ran it (tests/test_sample_job.py compares 1 and 4 devices); it does depend
on groups_per_batch (the shape of a chunk's draws).

Hosts and devices. Process p generates the chunks c with
c % process_count == p, each on its own local devices: the chunk's groups
are split over the largest number of local devices that divides C, by whole
groups (a group's members never split, so group attention stays on one
device). Nothing crosses hosts but two barriers; the workdir must be on
storage that every host sees.

Files in <workdir>/samples/:
  job.json               what the chunks are generated from (sample and model
                         settings, seed, checkpoint step); chunks of other
                         settings are moved aside to samples_stale_<time>/
  chunk_000123.npz       images uint8 [n, H, W, C], labels int32 [n], nfe
                         (and S_cross masses), written atomically (tmp file +
                         a rename; one object upload in a bucket); a rerun skips valid chunks and
                         regenerates missing, truncated or corrupt ones
  samples_<N>x<H>x<W>x3.npz  process 0, once every chunk exists: the ADM
                         sample batch, arr_0 uint8 [N, H, W, 3] (greyscale
                         repeated to RGB) and labels int32 [N], streamed chunk
                         by chunk with fixed zip timestamps (byte-identical
                         from run to run)
  samples.png            the first sample.grid_groups groups, one per row
                         (copied to <workdir>/samples.png, the demo's place)
  sample_settings.json   sampler, NFE, guidance, groups, dtype, seed,
                         checkpoint step, model, hosts and devices
  s_cross.json           with sample.s_cross=True (evaluation/s_cross.py, renoised_report)

Latent models (model.in_channels = 4) are decoded with the SD-VAE of
`sample.vae_path` (encoders/vae.py: latents / 0.18215, float32),
`sample.decode_batch_size` latents per call, to uint8 [n, 256, 256, 3].
"""

import functools
import json

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from groupdiff_jax import checkpoint, converted, errors, sample, sample_chunks, sharding, storage
from groupdiff_jax.sample import (NonfiniteSamplesError, chunk_sampler, host_local, is_latent, local_mesh,
                                  make_decoder)
from groupdiff_jax.encoders import vae as vae_lib
from groupdiff_jax.encoders import vae_weights
from groupdiff_jax.evaluation import s_cross
from groupdiff_jax.models.dit import model_from_config
from groupdiff_jax.progress import Progress

SETTINGS_FILE = 'sample_settings.json'
GRID_FILE = 'samples.png'
S_CROSS_FILE = 's_cross.json'
S_CROSS_STREAM = 1  # fold_in(chunk key, this): the S_cross probe's noise and sample ids
VAE_SOURCE = ('stabilityai/sd-vae-ft-mse (the official GroupDiff decoder): huggingface-cli download '
              'stabilityai/sd-vae-ft-mse diffusion_pytorch_model.safetensors --local-dir /weights/sd-vae-ft-mse')
REFERENCE_BATCH_URL = ('https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/'
                       'VIRTUAL_imagenet256_labeled.npz')


# --- Config checks ---------------------------------------------------------------


def check_config(config):
  """Every setting the job can check before loading a checkpoint; clear errors naming the field."""
  sample.check_sampler(config.model.objective, config.sample.sampler)
  sample.check_group_sizes(config.sample, config.model)
  if config.model.objective == 'dit':
    sample.dit_schedule(config.sample)
  sample_chunks.plan_from_config(config)
  if is_latent(config.model):
    path = config.sample.vae_path
    if not path:
      raise errors.ConfigError(
          f'model.in_channels={config.model.in_channels}: this model samples SD-VAE latents, which the sample job '
          'decodes to images. Set --config.sample.vae_path=/path/to/diffusion_pytorch_model.safetensors, '
          f'from {VAE_SOURCE}.')
    if not storage.retry(epath.Path(path).exists, path):
      raise errors.MissingInputError(f'sample.vae_path={path} does not exist; get the file from {VAE_SOURCE} and '
                                     'pass its path as --config.sample.vae_path=PATH.')
  if config.sample.s_cross:
    s_cross.s_cross_branch(config.sample)
    if not any(s_cross.group_attention_at(stage, config.sample.group_stage_fraction)
               for stage in config.sample.s_cross_stages):
      raise errors.ConfigError(f'sample.s_cross_stages={tuple(config.sample.s_cross_stages)}: group attention is off '
                               f'at all of them (sample.group_stage_fraction={config.sample.group_stage_fraction}); '
                               'measure at stages below that fraction.')


def _barrier(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def expected_params(model, config):
  """The configured model's params as ShapeDtypeStructs (jax.eval_shape: nothing is computed)."""
  from groupdiff_jax import train_step  # the model's canonical init
  return jax.eval_shape(lambda: train_step.init_params(model, jax.random.PRNGKey(0), config.model.input_size,
                                                       config.model.in_channels))


def check_finite(x, what, chunk, plan, step):
  """Raise WeightsError naming the chunk and first group when `x` [n, ...] holds NaN/inf (nothing is written)."""
  finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if not finite.all():
    first = int(np.argmin(finite))
    group = plan.groups(chunk)[0] + first // plan.images_per_group
    bad_groups = len(set(np.flatnonzero(~finite) // plan.images_per_group))
    raise errors.WeightsError(
        f'Chunk {chunk}, group {group} (and {bad_groups - 1} more group(s) of the chunk): the {what} hold NaN/inf; '
        f'the checkpoint of step {step} (or the sampler settings) give non-finite samples. Nothing of the chunk '
        'was written; sample from an earlier checkpoint or check the weights.')


# --- The settings record ------------------------------------------------------
def settings_record(config, plan, step, nfes, mesh):
  s, m = config.sample, config.model
  latent = is_latent(m)
  record = {
      'sampler': s.sampler, 'nfe_per_branch': sample_chunks.nfe_summary(nfes), 'num_steps': s.num_steps,
      'cfg_scale': s.cfg_scale, 'guidance_interval': [s.guidance_low, s.guidance_high],
      'guided_channels': s.guided_channels or 'all', 'cond_group_size': s.cond_group_size,
      'uncond_group_size': s.uncond_group_size, 'images_per_group': s.images_per_group,
      'group_stage_fraction': s.group_stage_fraction, 'fixed_sample_ids': s.fixed_sample_ids,
      'num_groups': plan.num_groups, 'num_images': plan.num_images, 'groups_per_chunk': plan.groups_per_chunk,
      'num_chunks': plan.num_chunks, 'class_of_group': 'g mod model.num_classes',
      'dtype': m.dtype, 'seed': config.seed, 'chunk_key': 'fold_in(PRNGKey(seed + 1), chunk)',
      'checkpoint_step': step, 'use_ema': s.use_ema,
      'model': {'variant': m.variant, 'objective': m.objective, 'path': m.path,
                'prediction': m.prediction, 'learn_sigma': m.learn_sigma,
                'max_group_size': m.max_group_size, 'in_channels': m.in_channels, 'input_size': m.input_size},
      'vae': ({'path': str(storage.path(s.vae_path)), 'dtype': 'float32',
               'scaling_factor': vae_lib.SD_VAE_CONFIG.scaling_factor} if latent else None),
      'processes': jax.process_count(), 'devices': jax.device_count(),
      'devices_per_process_used': mesh.size, 'platform': jax.default_backend(),
      'sample_config': s.to_dict(),
  }
  if m.objective == 'dit':
    record['timestep_respacing'] = sample.timestep_respacing(s)
  return json.loads(json.dumps(record))


# --- The job -------------------------------------------------------------------------
def sample_and_save(config, workdir, params=None, step=None, *, devices=None, process_index=None,
                    process_count=None, max_chunks=None, vae_config=vae_lib.SD_VAE_CONFIG):
  """Generate (or finish generating) the config's samples; see the module docstring.

  Args:
    config: the full config (model, sample, seed).
    workdir: run directory; samples go to <workdir>/samples/.
    params, step: model parameters and their training step; None loads the
      newest checkpoint of workdir (EMA weights when sample.use_ema).
    devices: this process's devices to use (default: all local ones).
    process_index, process_count: which chunks this call generates (default:
      jax's); tests run the parts of a multi-host job one after the other.
    max_chunks: stop after generating this many chunks (an interrupted run).
    vae_config: architecture of the VAE at sample.vae_path (tests: a tiny one).

  Returns:
    The path of the assembled samples npz, or None when chunks are missing
    (max_chunks reached, or other processes' parts not done).
  """
  check_config(config)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  main_process = process_index == 0
  say = logging.info if main_process else (lambda *_: None)  # absl: the progress of this job on process 0
  if params is None:
    converted.check_model_config(workdir, config.model)  # an imported checkpoint's learn_sigma, time convention
    params, step = checkpoint.load_params(workdir, config.sample.use_ema)
    say(f'Sampling from the checkpoint of step {step}.')
  model = model_from_config(config.model)
  # Before anything in the workdir moves: the checkpoint's params must be exactly the configured model's
  # (Flax ignores extra params: a depth-2 config would sample silently from 2 blocks of a depth-4 checkpoint).
  checkpoint.check_param_tree(checkpoint.flat_params(params), checkpoint.flat_params(expected_params(model, config)),
                              f'The checkpoint of step {step} in {workdir}')
  plan = sample_chunks.plan_from_config(config)
  samples_dir = str(storage.path(workdir) / sample_chunks.SAMPLES_DIR)
  chunk_file = functools.partial(sample_chunks.chunk_path, samples_dir)
  if main_process:
    sample_chunks.prepare_directory(samples_dir, sample_chunks.job_record(config, step))
  _barrier('groupdiff_jax.sample_job.prepare')

  mesh = local_mesh(plan.groups_per_chunk, devices)
  params = jax.device_put(host_local(params), sharding.replicated(mesh))
  run = chunk_sampler(model, config, mesh)
  decode, image_side = None, config.model.input_size
  if is_latent(config.model):
    if config.model.in_channels != vae_config.latent_channels:
      raise errors.ConfigError(f'model.in_channels={config.model.in_channels} but the VAE has '
                               f'{vae_config.latent_channels} latent channels: set '
                               f'--config.model.in_channels={vae_config.latent_channels}.')
    image_side *= vae_config.downsample_factor
    vae_params = vae_weights.load_vae_params(config.sample.vae_path, vae_config)
    decode = make_decoder(vae_params, vae_config, mesh, config.sample.decode_batch_size)
  measure = config.sample.s_cross
  needs_s_cross = lambda chunk: measure and plan.groups(chunk)[0] < config.sample.s_cross_groups

  mine = plan.chunks_of_process(process_index, process_count)
  for chunk in mine:
    leftover = epath.Path(chunk_file(chunk) + '.tmp')
    if leftover.exists():
      leftover.unlink()  # a write that was interrupted
  todo = [c for c in mine if sample_chunks.read_chunk(chunk_file(c), plan, c, needs_s_cross(c)) is None]
  done_images = sum(plan.num_chunk_images(c) for c in mine if c not in todo)
  say(f'{plan.num_images} images: {plan.num_groups} groups of {plan.images_per_group}, {plan.num_chunks} chunks '
      f'of {plan.groups_per_chunk} groups; process {process_index} of {process_count} makes {len(mine)} chunks '
      f'({len(mine) - len(todo)} already done) on {mesh.size} device(s).')
  progress = Progress('sampling', sum(plan.num_chunk_images(c) for c in mine), 'images', initial=done_images,
                      show=main_process)
  seed_key = jax.random.PRNGKey(config.seed + 1)
  for count, chunk in enumerate(todo):
    if max_chunks is not None and count >= max_chunks:
      say(f'Stopped after {max_chunks} chunk(s) (max_chunks); rerun the same command to continue.')
      break
    key = jax.random.fold_in(seed_key, chunk)
    x, nfe = run(params, plan.labels(chunk), key)
    x = np.asarray(x)[:plan.num_chunk_images(chunk)]  # [n, H, W, C] model space
    check_finite(x, 'model outputs', chunk, plan, step)
    try:
      images = decode(x) if decode is not None else sample.to_uint8(x)
    except NonfiniteSamplesError as error:
      group = plan.groups(chunk)[0] + error.args[0] // plan.images_per_group
      raise errors.WeightsError(f'Chunk {chunk}, group {group}: a decoded image holds NaN/inf (the VAE at '
                                f'sample.vae_path={config.sample.vae_path} is broken). Nothing of the chunk was '
                                'written.') from None
    arrays = dict(images=images, labels=plan.labels(chunk)[:len(x)], nfe=np.int64(int(nfe)))
    if needs_s_cross(chunk):
      start, stop = plan.groups(chunk)
      probed = (min(stop, config.sample.s_cross_groups) - start) * plan.images_per_group
      layers, mass = s_cross.renoised_masses(model, params, x[:probed], arrays['labels'][:probed],
                                             jax.random.fold_in(key, S_CROSS_STREAM), config.sample, config.model)
      arrays.update(s_cross_layers=layers, s_cross_mass=mass)
    sample_chunks.write_atomically(chunk_file(chunk), lambda f: np.savez(f, **arrays))
    done_images += len(x)
    progress(done_images)
  progress.close()
  _barrier('groupdiff_jax.sample_job.chunks')
  if not main_process:
    return None

  missing = [c for c in range(plan.num_chunks) if not storage.retry(epath.Path(chunk_file(c)).exists, chunk_file(c))]
  if missing:
    say(f'{len(missing)} of {plan.num_chunks} chunks still to generate (first: {chunk_file(missing[0])}); '
        'rerun the same command to continue.')
    return None
  path = sample_chunks.samples_path(samples_dir, plan.num_images, image_side)
  mtime = lambda file: storage.retry(epath.Path(file).stat, file).mtime
  newest_chunk = max(mtime(chunk_file(c)) for c in range(plan.num_chunks))
  if epath.Path(path).exists() and mtime(path) >= newest_chunk:
    say(f'{path} holds every chunk already.')
  else:
    sample_chunks.assemble(samples_dir, plan, image_side)
  grid = sample.save_grid(sample_chunks.first_groups(samples_dir, plan, config.sample.grid_groups),
                          plan.images_per_group, str(epath.Path(samples_dir) / GRID_FILE),
                          scale=sample.grid_scale(image_side))
  workdir_grid = storage.path(workdir) / GRID_FILE
  storage.retry(lambda: epath.Path(grid).copy(workdir_grid, overwrite=True), workdir_grid)
  settings = settings_record(config, plan, step, sample_chunks.chunk_nfes(samples_dir, plan), mesh)
  sample_chunks.write_json(epath.Path(samples_dir) / SETTINGS_FILE, settings)
  if measure:
    report = s_cross.renoised_report(*sample_chunks.gather_s_cross(samples_dir, plan, config.sample),
                                     config.sample)
    sample_chunks.write_json(epath.Path(samples_dir) / S_CROSS_FILE, report)
    say(f'S_cross ({report["branch"]} branch, {report["num_groups"]} groups): {report["mean_percent"]}% -> '
        f'{epath.Path(samples_dir) / S_CROSS_FILE}')
  return path


# --- --mode=eval -------------------------------------------------------------------
def evaluate_samples(config, workdir):
  """ADM evaluator on <workdir>/samples/samples_*.npz; writes samples_*.eval.json beside it.

  Returns (results dict, path of the JSON).
  """
  from groupdiff_jax.evaluation import evaluator, inception
  needed = []
  if not config.eval.reference_batch:
    needed.append('--config.eval.reference_batch=/path/VIRTUAL_imagenet256_labeled.npz (the ImageNet 256 '
                  f'reference batch of openai/guided-diffusion: {REFERENCE_BATCH_URL})')
  if not config.eval.inception_graph:
    needed.append(f'--config.eval.inception_graph=/path/classify_image_graph_def.pb ({inception.INCEPTION_URL})')
  if needed:
    raise errors.ConfigError('--mode=eval needs ' + ' and '.join(needed) + '.')
  samples_dir = storage.path(workdir) / sample_chunks.SAMPLES_DIR
  found = sorted(str(p) for p in samples_dir.glob('samples_*.npz'))
  if not found:
    raise errors.MissingInputError(f'No samples_*.npz in {samples_dir}: run --mode=sample with the same config '
                                   'and workdir first.')
  if len(found) > 1:
    raise errors.DataError(f'Several sample batches in {samples_dir}: {found}; keep one (move the others away).')
  results = evaluator.evaluate(config.eval.reference_batch, found[0], config.eval.inception_graph)
  output = evaluator.default_output_path(found[0])
  sample_chunks.write_json(output, results)
  return results, output
