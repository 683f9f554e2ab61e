"""Exact resume with the latent-store pipeline (prefetching, random flips, group streams)."""

import logging
import shutil

import numpy as np

from configs import imagenet_latents
from groupdiff_jax import checkpoint, train
from groupdiff_jax.data import latent_store
from tests.test_resume import assert_trees_equal

M = 64


def latents_config(latent_dir, num_steps):
  config = imagenet_latents.get_config()
  for key, value in {'model.variant': 'SiT-S/8', 'model.depth': 1, 'model.hidden_size': 32, 'model.num_heads': 2,
                     'model.num_classes': 6, 'train.batch_size': 16, 'train.group_ratio': 0.25,
                     'train.mixed_steps': True, 'train.num_steps': num_steps, 'train.log_every': 2,
                     'train.checkpoint_every': 2, 'data.latent_dir': latent_dir, 'data.grouping': 'random',
                     'data.random_flip': True}.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def test_latent_store_run_resumes_bit_identically(tmp_path, caplog):
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((M, 2, 32, 32, 4)).astype(np.float16)  # [M, (plain, flipped), H, W, C]
  latent_store.write_latent_store(tmp_path / 'latents', latents, np.arange(M) % 6, {'vae': 'test'})
  store = str(tmp_path / 'latents')
  whole = train.train_and_evaluate(latents_config(store, 4), str(tmp_path / 'whole'))  # saved at steps 2 and 4
  # The run stopped after step 2: a copy of its workdir without the checkpoint of step 4.
  shutil.copytree(tmp_path / 'whole', tmp_path / 'half')
  shutil.rmtree(tmp_path / 'half' / 'checkpoints' / '4')
  assert checkpoint.checkpoint_manager(str(tmp_path / 'half')).latest_step() == 2
  caplog.set_level(logging.INFO)
  resumed = train.train_and_evaluate(latents_config(store, 4), str(tmp_path / 'half'))
  assert 'Resumed from step 2' in caplog.text and int(resumed.step) == 4
  for field in checkpoint.SAVED_FIELDS:
    assert_trees_equal(getattr(whole, field), getattr(resumed, field))
