"""Latent extraction on a mock TFDS ImageNet with a tiny random VAE: store format, resume, flips, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from groupdiff_jax.data import extract_latents_job, latent_store, preprocess, shards, tfds_source
from groupdiff_jax.encoders import vae as vae_lib

# Two blocks (downsample 2) on 64 px crops: 32x32x4 latents like SD-VAE on 256 px, at a fraction of the cost.
TINY = vae_lib.VAEConfig(block_out_channels=(4, 4), layers_per_block=1, norm_num_groups=2)
SIDE = 64
ROWS = 10


@pytest.fixture(scope='module')
def params():
  # Random weights from the shapes only (an eager init of the VAE takes tens of seconds on a busy CPU).
  shapes = jax.eval_shape(vae_lib.AutoencoderKL(TINY).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes['params'])


def extract(out, params, **kw):
  opts = dict(vae_config=TINY, vae_name='tiny', batch_size=4, shard_size=4, image_size=SIDE)
  opts.update(kw)
  with tfds.testing.mock_data(num_examples=ROWS):
    return extract_latents_job.run(str(out), params, **opts)


def test_interrupted_extraction_resumes_to_the_same_store(tmp_path, params):
  assert extract(tmp_path / 'a', params, max_shards=1) is None  # interrupted after one of three shards
  job_shards = sorted((tmp_path / 'a' / shards.SHARD_DIR).glob('*.npz'))
  assert [p.name for p in job_shards] == ['000000.npz']
  assert extract(tmp_path / 'a', params) == str(tmp_path / 'a')
  resumed = latent_store.LatentStore(str(tmp_path / 'a'), verify_checksum=True)
  extract(tmp_path / 'b', params)
  whole = latent_store.LatentStore(str(tmp_path / 'b'))
  assert resumed.latents.shape == (ROWS, 32, 32, 4) and resumed.latents.dtype == np.float16
  np.testing.assert_array_equal(resumed.latents, whole.latents)  # no duplicates, no gaps, same noise
  with tfds.testing.mock_data(num_examples=ROWS):
    labels = [int(e['label']) for e in tfds.builder('imagenet2012').as_dataset(split='train', shuffle_files=False)]
  np.testing.assert_array_equal(resumed.labels, labels)  # the split's order
  assert resumed.meta['posterior'] == 'sample' and resumed.meta['scale'] == 0.18215
  with pytest.raises(shards.ShardError, match='other settings'):
    extract(tmp_path / 'a', params, posterior='mean')


def test_flip_stores_the_mirrored_crop_and_mean_is_deterministic(tmp_path, params):
  extract(tmp_path, params, flip=True, posterior='mean', shard_size=16)
  store = latent_store.LatentStore(str(tmp_path))
  assert store.has_flips and store.latents.shape == (ROWS, 2, 32, 32, 4)
  with tfds.testing.mock_data(num_examples=ROWS):
    builder, count = tfds_source.open_split('imagenet2012', 'train')
    images, _ = next(tfds_source.cropped_batches(builder, 'train', 0, 2, SIDE, 2))
  vae = vae_lib.AutoencoderKL(TINY)
  x = preprocess.to_unit_range(images)
  for copy, view in ((0, x), (1, x[:, :, ::-1])):
    want = jax.jit(vae_lib.latents_from_images, static_argnums=0)(vae, params, jnp.asarray(view))
    np.testing.assert_allclose(np.asarray(store.latents[:2, copy], np.float32), want, atol=2e-3, rtol=2e-3)


def test_adm_center_crop_shapes():
  image = np.random.default_rng(0).integers(0, 255, (600, 1000, 3), np.uint8)
  assert preprocess.center_crop_arr(image, 256).shape == (256, 256, 3)
  assert preprocess.center_crop_arr(image[:100, :130], 256).shape == (256, 256, 3)


def test_unprepared_dataset_gives_the_steps(tmp_path, params):
  with pytest.raises(tfds_source.DatasetNotReady, match='ILSVRC2012_img_train.tar'):
    extract_latents_job.run(str(tmp_path / 'out'), params, vae_config=TINY, data_dir=str(tmp_path / 'tfds'),
                            image_size=SIDE)
  with pytest.raises(tfds_source.DatasetNotReady, match='--manual_dir'):
    extract_latents_job.run(str(tmp_path / 'out'), params, vae_config=TINY, data_dir=str(tmp_path / 'tfds'),
                            manual_dir=str(tmp_path / 'empty'), image_size=SIDE)
