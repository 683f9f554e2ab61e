"""Embedding job: ImageNet (TFDS) -> ADM centre crop 256 -> DINOv2 / CLIP -> L2-normalised embeddings.

  python -m groupdiff_jax.data.embeddings_job --encoder=dinov2_l14 --weights=/weights/dinov2-large \
      --data_dir=~/tensorflow_datasets --output_dir=/data/in256_dinov2_l14

Writes `embeddings.npy` (float32 [M, D], L2-normalised, rows in the TFDS
split's fixed order, the latent store's order) and `meta.json` (encoder, D,
source, count). Encoders: dinov2_l14 (official GroupDiff default, CLS
token, D=1024), dinov2_b14 (D=768), clip_l14 (the paper's, projected image
embedding, D=768), each with its own preprocessing of the 256 px ADM crop
(encoders/dinov2.py, encoders/clip.py). Sharded over the local devices and
hosts and resumable like the latent job (rerun the same command). Next:
python -m groupdiff_jax.data.neighbors_job --embeddings_dir=<output_dir> ...
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from groupdiff_jax import distributed, errors, weights_io
from groupdiff_jax.data import latent_store, shards, tfds_source
from groupdiff_jax.encoders import clip, dinov2, vit
from groupdiff_jax.progress import Progress

CROP_SIZE = 256  # the ADM crop every encoder starts from
ENCODERS = {'dinov2_l14': (dinov2, dinov2.DINOV2_L14), 'dinov2_b14': (dinov2, dinov2.DINOV2_B14),
            'clip_l14': (clip, clip.CLIP_L14)}


class JobInputError(errors.UserError, ValueError):
  """An input that cannot be used; the message says what to do."""


@functools.partial(jax.jit, static_argnums=0)
def embed_batch(model, params, pixels):
  """Normalised pixels [B, S, S, 3] -> L2-normalised embeddings float32 [B, D]."""
  z = model.apply({'params': params}, pixels)
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def run(output_dir, encoder, params, config=None, dataset='imagenet2012', split='train', data_dir=None,
        manual_dir=None, batch_size=64, shard_size=10_000, max_shards=None, process_index=0, process_count=1,
        compute_dtype='float32'):
  """The job (arguments as the flags); returns the output directory, or None while shards remain."""
  if encoder not in ENCODERS:
    raise JobInputError(f'--encoder={encoder!r}; use one of {sorted(ENCODERS)}.')
  module, default_config = ENCODERS[encoder]
  config = config or default_config
  builder, num_rows = tfds_source.open_split(dataset, split, data_dir, manual_dir)
  settings = {'dataset': dataset, 'split': split, 'encoder': encoder, 'crop': CROP_SIZE}
  job = shards.ShardedJob(output_dir, settings, num_rows, shard_size, process_index, process_count)
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.local_devices()), ('data',))
  if batch_size % len(mesh.devices):
    raise JobInputError(f'--batch_size={batch_size} must be a multiple of the {len(mesh.devices)} local devices.')
  params = jax.device_put(params, NamedSharding(mesh, P()))
  model = vit.ViT(config, dtype=jnp.dtype(compute_dtype))
  todo = job.todo()[:max_shards]
  todo_rows = sum(job.rows(s)[1] - job.rows(s)[0] for s in todo)
  logging.info('Embeddings (%s): %s/%s, %s rows in %d shards; %d done, %d to do on host %d (%s rows).', encoder,
               dataset, split, f'{num_rows:,}', job.num_shards, len(job.done()), len(todo), process_index,
               f'{todo_rows:,}', extra=distributed.ALL_PROCESSES)
  progress, done_rows = Progress('embeddings', todo_rows, 'images', show=process_index == 0), 0
  for shard in todo:
    start, end = job.rows(shard)
    parts = []
    for images, _ in tfds_source.cropped_batches(builder, split, start, end, CROP_SIZE, batch_size):
      count = len(images)
      pixels = module.preprocess(images)
      if count < batch_size:  # one compiled shape
        pixels = np.concatenate([pixels, np.zeros((batch_size - count,) + pixels.shape[1:], pixels.dtype)])
      z = embed_batch(model, params, jax.device_put(pixels, NamedSharding(mesh, P('data'))))
      parts.append(np.asarray(z, np.float32)[:count])
      done_rows += count
      progress(done_rows)
    job.write(shard, embeddings=np.concatenate(parts))
    job.report(f'shard {shard} done; {done_rows:,}/{todo_rows:,} images this run')
  progress(done_rows, force=True)
  progress.close()
  missing = job.num_shards - len(job.done())
  if missing:
    print(f'{missing} shard(s) still missing (other hosts, or --max_shards): run the same command again.')
    return None
  if process_index != 0:
    return None
  job.finalize({'embeddings': 'embeddings.npy'})
  dim = config.projection_dim or config.hidden_size
  latent_store.write_meta(output_dir, {'encoder': encoder, 'D': dim, 'source': f'tfds:{dataset}/{split}',
                                       'count': num_rows, 'normalized': 'l2', 'crop': 'adm_center_crop_256'})
  print(f'Embeddings written: {output_dir}/embeddings.npy [{num_rows:,}, {dim}].')
  return output_dir


FLAGS = flags.FLAGS


def define_flags():
  """The job's flags (defined only when run as a program, so importing the module defines none)."""
  flags.DEFINE_string('output_dir', None, 'Where embeddings.npy and meta.json go (and shards while running).')
  flags.DEFINE_enum('encoder', 'dinov2_l14', sorted(ENCODERS), 'Image encoder.')
  flags.DEFINE_string('weights', None, 'model.safetensors of the encoder (or its directory).')
  flags.DEFINE_string('dataset', 'imagenet2012', 'TFDS dataset name.')
  flags.DEFINE_string('split', 'train', 'TFDS split.')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir.')
  flags.DEFINE_string('manual_dir', None, 'Directory holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.')
  flags.DEFINE_integer('batch_size', 64, 'Images per call (a multiple of the local devices).')
  flags.DEFINE_integer('shard_size', 10_000, 'Rows per shard (the unit of resumption).')
  flags.DEFINE_integer('max_shards', None, 'Stop after this many shards (then rerun to continue).')
  flags.DEFINE_enum('compute_dtype', 'float32', ['float32', 'bfloat16'], 'Encoder compute dtype.')


def main(argv):
  del argv
  start = time.time()
  module, config = ENCODERS[FLAGS.encoder]
  try:
    params = module.load_params(FLAGS.weights, config)
    run(FLAGS.output_dir, FLAGS.encoder, params, config, FLAGS.dataset, FLAGS.split, FLAGS.data_dir,
        FLAGS.manual_dir, FLAGS.batch_size, FLAGS.shard_size, FLAGS.max_shards, jax.process_index(),
        jax.process_count(), FLAGS.compute_dtype)
  except (FileNotFoundError, weights_io.WeightsImportError, JobInputError, tfds_source.DatasetNotReady, shards.ShardError) as e:
    raise errors.UserError(f'embeddings_job: {e}') from None
  print(f'Done in {time.time() - start:.0f} s.')


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['output_dir', 'weights'])
  errors.run_main(main)
