"""Latent extraction job: ImageNet (TFDS) -> ADM centre crop 256 -> SD-VAE -> latent store.

  python -m groupdiff_jax.data.extract_latents_job \
      --vae_path=/weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors \
      --data_dir=~/tensorflow_datasets --manual_dir=~/tensorflow_datasets/downloads/manual \
      --output_dir=/data/in256_latents --flip

Writes the latent store of docs/method.md, Data formats (latents.npy float16
[M, 32, 32, 4], or [M, 2, 32, 32, 4] with --flip where [:, 1] encodes the
horizontally flipped crop; labels.npy int32 [M]; meta.json), rows in the
TFDS split's fixed order. Official GroupDiff stores one posterior sample of
sd-vae-ft-ema (the default here); --posterior=mean stores the mean.

Runs on every local device (the batch split over them) and on several
hosts (shard k goes to host k % process_count). Shards of --shard_size rows
are written atomically; an interrupted run restarts where it stopped
(rerun the same command) without duplicates or gaps, and the posterior
noise depends only on (--seed, shard, batch), so a resumed store equals an
uninterrupted one. When every shard exists, the store is assembled and
checksummed. If the dataset is not prepared, the job prints the steps to
prepare it and exits.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath

from groupdiff_jax import distributed, errors, weights_io
from groupdiff_jax.data import latent_store, shards, tfds_source
from groupdiff_jax.encoders import vae as vae_lib
from groupdiff_jax.progress import Progress

IMAGE_SIZE = 256  # ImageNet 256: SD-VAE latents 32x32x4


class JobInputError(errors.UserError, ValueError):
  """An input that cannot be used; the message says what to do."""


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def encode_batch(vae, posterior, flip, dtype, params, images, rng):
  """uint8 images [B, S, S, 3] -> scaled latents [B, h, w, c], or [B, 2, h, w, c] with the mirrored crop, in dtype.

  Module-level jit: runs of the job in one process (tests) share the
  compiled function; the batch keeps the sharding it arrives with.
  """
  x = images.astype(jnp.float32) / 127.5 - 1.0  # [B, S, S, 3] in [-1, 1]
  if flip:
    x = jnp.concatenate([x, x[:, :, ::-1]])  # [2B, ...]: the crops, then their mirror images
  z = vae_lib.latents_from_images(vae, params, x, rng if posterior == 'sample' else None)
  if flip:
    z = jnp.stack(jnp.split(z, 2), axis=1)  # [B, 2, h, w, c]
  return z.astype(dtype)


def make_encoder(vae, vae_params, posterior, flip, dtype):
  """(uint8 images [B, S, S, 3], rng) -> latents, the batch split over the local devices; and the device count."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.local_devices()), ('data',))
  batch_sharding = NamedSharding(mesh, P('data'))
  params = jax.device_put(vae_params, NamedSharding(mesh, P()))

  def encode(images, rng):
    return encode_batch(vae, posterior, flip, dtype, params, jax.device_put(images, batch_sharding), rng)

  return encode, len(mesh.devices)


def run(output_dir, vae_params, vae_config=None, vae_name='sd-vae-ft-ema', dataset='imagenet2012', split='train',
        data_dir=None, manual_dir=None, batch_size=64, shard_size=10_000, posterior='sample', flip=False,
        dtype='float16', seed=0, max_shards=None, process_index=0, process_count=1, compute_dtype='float32',
        image_size=IMAGE_SIZE):
  """The job (arguments as the flags); returns the store directory, or None while shards remain."""

  if posterior not in ('sample', 'mean'):
    raise JobInputError(f"--posterior={posterior!r}; use 'sample' (official) or 'mean'.")
  if dtype not in latent_store.LATENT_DTYPES:
    raise JobInputError(f'--dtype={dtype!r}; use one of {latent_store.LATENT_DTYPES}.')
  vae_config = vae_config or vae_lib.SD_VAE_CONFIG
  latent_side = image_size // vae_config.downsample_factor
  if (latent_side, latent_side, vae_config.latent_channels) != latent_store.LATENT_SHAPE:
    raise JobInputError(f'VAE latents [{latent_side}, {latent_side}, {vae_config.latent_channels}] at {image_size} '
                        f'px are not the store format {latent_store.LATENT_SHAPE}.')
  builder, num_rows = tfds_source.open_split(dataset, split, data_dir, manual_dir)
  settings = {'dataset': dataset, 'split': split, 'vae': vae_name, 'posterior': posterior, 'flip': flip,
              'dtype': dtype, 'seed': seed, 'image_size': image_size}
  job = shards.ShardedJob(output_dir, settings, num_rows, shard_size, process_index, process_count)
  out_dtype = jnp.dtype(dtype)
  vae = vae_lib.AutoencoderKL(vae_config, dtype=jnp.dtype(compute_dtype))
  encode, num_devices = make_encoder(vae, vae_params, posterior, flip, out_dtype)
  if batch_size % num_devices:
    raise JobInputError(f'--batch_size={batch_size} must be a multiple of the {num_devices} local devices.')

  todo = job.todo()[:max_shards]
  todo_rows = sum(job.rows(s)[1] - job.rows(s)[0] for s in todo)
  logging.info('Latent extraction: %s/%s, %s rows in %d shards; %d done, %d to do on host %d (%s rows), %d device(s), '
               'posterior=%s, flip=%s.', dataset, split, f'{num_rows:,}', job.num_shards, len(job.done()), len(todo),
               process_index, f'{todo_rows:,}', num_devices, posterior, flip, extra=distributed.ALL_PROCESSES)
  progress = Progress('latents', todo_rows, 'images', show=process_index == 0)
  done_rows = 0
  base_key = jax.random.PRNGKey(seed)
  for shard in todo:
    start, end = job.rows(shard)
    latents, labels = [], []
    shard_key = jax.random.fold_in(base_key, shard)
    for index, (images, batch_labels) in enumerate(
        tfds_source.cropped_batches(builder, split, start, end, image_size, batch_size)):
      count = len(images)
      if count < batch_size:  # one compiled shape: pad the last batch
        images = np.concatenate([images, np.zeros((batch_size - count,) + images.shape[1:], images.dtype)])
      z = encode(images, jax.random.fold_in(shard_key, index))
      latents.append(np.asarray(z)[:count])
      labels.append(batch_labels)
      done_rows += count
      progress(done_rows)
    job.write(shard, latents=np.concatenate(latents), labels=np.concatenate(labels).astype(np.int32))
    job.report(f'shard {shard} done; {done_rows:,}/{todo_rows:,} images this run')
  progress(done_rows, force=True)
  progress.close()

  missing = job.num_shards - len(job.done())
  if missing:
    print(f'{missing} shard(s) still missing (other hosts, or --max_shards): run the same command again to finish; '
          f'the store is assembled once every shard exists.')
    return None
  if process_index != 0:
    return None
  job.finalize({'latents': latent_store.LATENTS, 'labels': latent_store.LABELS})
  meta = {'source': f'tfds:{dataset}/{split}', 'vae': vae_name, 'scale': vae_config.scaling_factor,
          'resolution': image_size, 'posterior': posterior, 'crop': 'adm_center_crop', 'seed': seed,
          'count': num_rows, 'dtype': dtype, 'flipped': flip, 'checksum': latent_store.store_checksum(output_dir)}
  latent_store.write_meta(output_dir, meta)
  latent_store.LatentStore(output_dir)  # validate what was written
  print(f'Latent store written: {output_dir} ({num_rows:,} rows, {meta["checksum"]}). The shards in '
        f'{job.shard_dir} can be deleted.')
  return output_dir


FLAGS = flags.FLAGS


def define_flags():
  """The job's flags (defined only when run as a program, so importing the module defines none)."""
  flags.DEFINE_string('output_dir', None, 'Directory of the latent store (and its shards while running).')
  flags.DEFINE_string('vae_path', None, 'diffusers AutoencoderKL safetensors (sd-vae-ft-ema for the official setup).')
  flags.DEFINE_string('vae_name', 'sd-vae-ft-ema', 'Recorded in meta.json.')
  flags.DEFINE_string('dataset', 'imagenet2012', 'TFDS dataset name.')
  flags.DEFINE_string('split', 'train', 'TFDS split.')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default: ~/tensorflow_datasets).')
  flags.DEFINE_string('manual_dir', None, 'Directory holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.')
  flags.DEFINE_integer('batch_size', 64, 'Images per encode call (a multiple of the local devices).')
  flags.DEFINE_integer('shard_size', 10_000, 'Rows per shard (the unit of resumption).')
  flags.DEFINE_enum('posterior', 'sample', ['sample', 'mean'], 'Store a posterior sample (official) or the mean.')
  flags.DEFINE_bool('flip', False, 'Also store the latent of the horizontally flipped crop ([M, 2, 32, 32, 4]).')
  flags.DEFINE_enum('dtype', 'float16', list(latent_store.LATENT_DTYPES), 'Storage dtype of the latents.')
  flags.DEFINE_enum('compute_dtype', 'float32', ['float32', 'bfloat16'], 'VAE compute dtype.')
  flags.DEFINE_integer('seed', 0, 'Seed of the posterior samples.')
  flags.DEFINE_integer('max_shards', None, 'Stop after this many shards (then rerun to continue).')


def main(argv):
  del argv
  from groupdiff_jax.encoders import vae_weights
  if not FLAGS.vae_path or not epath.Path(FLAGS.vae_path).exists():
    raise errors.UserError(f'extract_latents_job: --vae_path={FLAGS.vae_path!r} does not exist. Download it with\n  '
                     f'huggingface-cli download stabilityai/sd-vae-ft-ema diffusion_pytorch_model.safetensors '
                     f'--local-dir /weights/sd-vae-ft-ema')
  start = time.time()
  try:
    params = vae_weights.load_vae_params(FLAGS.vae_path)
    run(FLAGS.output_dir, params, vae_name=FLAGS.vae_name, dataset=FLAGS.dataset, split=FLAGS.split,
        data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir, batch_size=FLAGS.batch_size,
        shard_size=FLAGS.shard_size, posterior=FLAGS.posterior, flip=FLAGS.flip, dtype=FLAGS.dtype, seed=FLAGS.seed,
        max_shards=FLAGS.max_shards, process_index=jax.process_index(), process_count=jax.process_count(),
        compute_dtype=FLAGS.compute_dtype)
  except (JobInputError, tfds_source.DatasetNotReady, shards.ShardError, latent_store.StoreError,
          weights_io.WeightsImportError) as e:
    raise errors.UserError(f'extract_latents_job: {e}') from None
  print(f'Done in {time.time() - start:.0f} s.')


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['output_dir', 'vae_path'])
  errors.run_main(main)
