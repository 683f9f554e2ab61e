"""The sample job: chunks, resume, hosts and devices, VAE decoding, outputs, S_cross, --mode=eval.

A depth-1 SiT on 8x8 images (or 8x8x4 latents with a tiny random VAE) and
two Euler steps keep every run to a few seconds. The multi-device check runs
in a subprocess with 4 fake CPU devices (XLA_FLAGS must be set before JAX
starts; this pytest process has one device).
"""

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from configs import digits
from groupdiff_jax import sample, sample_chunks, sample_job, sharding
from groupdiff_jax.encoders import vae as vae_lib
from groupdiff_jax.encoders import vae_weights
from groupdiff_jax.evaluation import evaluator
from groupdiff_jax.models.dit import model_from_config
from tests import cpu_devices
from tests.test_vae import TINY as TINY_VAE
from tests.test_vae import random_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**sample_fields):
  """5 groups of 4 in chunks of 2 groups: 3 chunks, the last with one real group."""
  config = digits.get_config()
  config.model.update(depth=1, hidden_size=32, num_heads=2, input_size=8, variant='SiT-S/2')
  config.sample.update(sampler='euler', num_steps=2, num_groups=5, images_per_group=4, groups_per_batch=2,
                       cfg_scale=2.0, grid_groups=3, group_stage_fraction=1.0)  # S_cross probes every stage
  config.sample.update(**sample_fields)
  return config


def random_params(model_config, seed=0):
  """Random everywhere (adaLN-Zero init would make every sample the same)."""
  model = model_from_config(model_config)
  side, channels = model_config.input_size, model_config.in_channels
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((4, side, side, channels)), jnp.zeros(4),
                          jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32), shapes)


def chunk_files(workdir):
  return sorted(f for f in os.listdir(os.path.join(workdir, 'samples')) if f.startswith('chunk_'))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """One complete run: (config, params, workdir, path of the assembled npz)."""
  config = tiny_config()
  params = random_params(config.model)
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  path = sample_job.sample_and_save(config, workdir, params, step=7)
  return config, params, workdir, path


def test_outputs_are_an_adm_batch_grid_and_settings(uninterrupted):
  config, _, workdir, path = uninterrupted
  assert os.path.basename(path) == 'samples_20x8x8x3.npz'
  assert chunk_files(workdir) == ['chunk_000000.npz', 'chunk_000001.npz', 'chunk_000002.npz']
  with np.load(path) as data:
    images, labels = data['arr_0'], data['labels']
  assert images.dtype == np.uint8 and images.shape == (20, 8, 8, 3)
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # greyscale repeated to RGB
  np.testing.assert_array_equal(labels, sample.group_labels(5, 4, 10))  # group g is class g mod 10
  assert images.std() > 10  # not a constant image
  # The evaluator streams it (header, batches) and sees the same pixels.
  view = evaluator.open_images(path)
  assert view.shape == (20, 8, 8, 3)
  np.testing.assert_array_equal(np.concatenate(list(view.batches(7))), images)
  # Grid: 3 groups (rows) of 4, in samples/ and at the workdir top level (the demo's place).
  grid = Image.open(os.path.join(workdir, 'samples', 'samples.png'))
  assert grid.size == (4 * (8 * 8 + 8) + 8, 3 * (8 * 8 + 8) + 8)  # 8x8 images upscaled 8x, 1 px borders
  assert filecmp.cmp(os.path.join(workdir, 'samples.png'), os.path.join(workdir, 'samples', 'samples.png'))
  with open(os.path.join(workdir, 'samples', 'sample_settings.json')) as f:
    settings = json.load(f)
  assert settings['nfe_per_branch'] == 2 and settings['sampler'] == 'euler' and settings['num_steps'] == 2
  assert settings['checkpoint_step'] == 7 and settings['num_images'] == 20 and settings['num_chunks'] == 3
  assert settings['cfg_scale'] == 2.0 and settings['guidance_interval'] == [0.0, 1.0]
  assert settings['cond_group_size'] == 1 and settings['uncond_group_size'] == 4
  assert settings['dtype'] == 'float32' and settings['seed'] == 0 and settings['processes'] == 1
  assert settings['model']['objective'] == 'sit' and settings['vae'] is None


def test_interrupted_job_resumes_to_the_uninterrupted_output(uninterrupted, tmp_path):
  config, params, _, reference = uninterrupted
  workdir = str(tmp_path)
  assert sample_job.sample_and_save(config, workdir, params, step=7, max_chunks=1) is None  # "killed" after 1
  assert chunk_files(workdir) == ['chunk_000000.npz']
  assert not [f for f in os.listdir(os.path.join(workdir, 'samples')) if f.startswith('samples_')]
  assert sample_job.sample_and_save(config, workdir, params, step=7, max_chunks=1) is None
  assert chunk_files(workdir) == ['chunk_000000.npz', 'chunk_000001.npz']
  # A truncated chunk, and the tmp file of a write that was killed.
  first = os.path.join(workdir, 'samples', 'chunk_000000.npz')
  second = os.path.join(workdir, 'samples', 'chunk_000001.npz')
  with open(second, 'r+b') as f:
    f.truncate(os.path.getsize(second) // 2)
  with open(os.path.join(workdir, 'samples', 'chunk_000002.npz.tmp'), 'wb') as f:
    f.write(b'partial')
  first_mtime = os.stat(first).st_mtime_ns
  path = sample_job.sample_and_save(config, workdir, params, step=7)
  assert chunk_files(workdir) == ['chunk_000000.npz', 'chunk_000001.npz', 'chunk_000002.npz']  # no duplicates
  assert not [f for f in os.listdir(os.path.join(workdir, 'samples')) if f.endswith('.tmp')]
  assert os.stat(first).st_mtime_ns == first_mtime  # a complete chunk is not generated again
  assert filecmp.cmp(path, reference, shallow=False)  # bit for bit


def test_processes_split_the_chunks_and_give_the_single_process_output(uninterrupted, tmp_path):
  config, params, _, reference = uninterrupted
  workdir = str(tmp_path)
  # Process 0 of 2 makes chunks 0 and 2, then waits for chunk 1 (no assembly yet).
  assert sample_job.sample_and_save(config, workdir, params, step=7, process_index=0, process_count=2) is None
  assert chunk_files(workdir) == ['chunk_000000.npz', 'chunk_000002.npz']
  assert sample_job.sample_and_save(config, workdir, params, step=7, process_index=1, process_count=2) is None
  path = sample_job.sample_and_save(config, workdir, params, step=7, process_index=0, process_count=2)
  assert filecmp.cmp(path, reference, shallow=False)
  assert sample_chunks.ChunkPlan(10, 4, 3, 10).chunks_of_process(1, 3) == [1]  # 4 chunks, c % 3 == 1


def test_other_settings_move_old_samples_aside(uninterrupted, tmp_path):
  config, _, workdir, _ = uninterrupted
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  samples_dir = os.path.join(copy, 'samples')
  record = sample_chunks.job_record(config, 7)
  sample_chunks.prepare_directory(samples_dir, record)  # same settings: kept
  assert len(chunk_files(copy)) == 3
  changed = config.copy_and_resolve_references()
  changed.sample.cfg_scale = 3.0
  sample_chunks.prepare_directory(samples_dir, sample_chunks.job_record(changed, 7))
  assert chunk_files(copy) == []
  (stale,) = [d for d in os.listdir(copy) if d.startswith('samples_stale_')]
  assert len(os.listdir(os.path.join(copy, stale))) > 3  # moved, not deleted
  # Fields that only change how outputs are written or measured keep the chunks.
  output_only = config.copy_and_resolve_references()
  output_only.sample.update(s_cross=True, decode_batch_size=3, grid_groups=1)
  assert sample_chunks.job_record(output_only, 7) == record


def test_a_cut_short_job_file_moves_its_chunks_aside(uninterrupted, tmp_path):
  config, _, workdir, _ = uninterrupted
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  samples_dir = os.path.join(copy, 'samples')
  job_path = os.path.join(samples_dir, sample_chunks.JOB_FILE)
  with open(job_path) as f:
    text = f.read()
  with open(job_path, 'w') as f:
    f.write(text[:len(text) // 2])
  record = sample_chunks.job_record(config, 7)
  sample_chunks.prepare_directory(samples_dir, record)
  assert chunk_files(copy) == []
  (stale,) = [d for d in os.listdir(copy) if d.startswith('samples_stale_')]
  assert len(os.listdir(os.path.join(copy, stale))) > 3
  with open(job_path) as f:
    assert json.load(f) == record  # a fresh job file for the new chunks


WORKER = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, os.getcwd())
    import jax, numpy as np
    from tests.test_sample_job import tiny_config, random_params
    from groupdiff_jax import sample_chunks, sample_job, sharding
    from groupdiff_jax.models.dit import model_from_config
    assert jax.local_device_count() == 4
    workdir = sys.argv[1]
    config = tiny_config()  # the fixture's job: chunks of 2 groups of 4
    params = random_params(config.model)
    path = sample_job.sample_and_save(config, workdir, params, step=7)
    with open(os.path.join(workdir, 'samples', 'sample_settings.json')) as f:
      used = json.load(f)['devices_per_process_used']
    # Where one chunk's images live: the job's (cached) sampler on its mesh.
    mesh = sample_job.local_mesh(2)
    run = sample_job.chunk_sampler(model_from_config(config.model), config, mesh)
    x, _ = run(jax.device_put(params, sharding.replicated(mesh)), sample_chunks.plan_from_config(config).labels(0),
               jax.random.PRNGKey(0))
    shards = sorted(len(s.data) for s in x.addressable_shards)
    print('RESULT ' + json.dumps(dict(path=path, used=used, shards=shards)))
''')


def test_devices_split_chunks_by_whole_groups_and_give_the_one_device_output(uninterrupted, tmp_path):
  env = cpu_devices.env(4, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run([sys.executable, '-c', WORKER, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads([l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1][len('RESULT '):])
  # 2 groups per chunk on 4 devices: 2 devices used (a group never splits), one group of 4 images each.
  assert result['used'] == 2 and result['shards'] == [4, 4]
  assert filecmp.cmp(result['path'], uninterrupted[3], shallow=False)  # = the 1-device run, bit for bit


def test_latents_are_decoded_with_the_vae_in_batches(tmp_path):
  config = tiny_config(num_groups=2, groups_per_batch=2, decode_batch_size=3)
  config.model.in_channels = 4
  with pytest.raises(ValueError, match=r'sample\.vae_path.*sd-vae-ft-mse'):
    sample_job.sample_and_save(config, str(tmp_path / 'none'), {}, 0)
  vae_path = str(tmp_path / 'vae.safetensors')
  safetensors.numpy.save_file(random_state_dict(TINY_VAE, seed=1), vae_path)
  config.sample.vae_path = vae_path
  params = random_params(config.model)
  path = sample_job.sample_and_save(config, str(tmp_path / 'run'), params, 0, vae_config=TINY_VAE)
  with np.load(path) as data:
    images = data['arr_0']
  assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8  # 8x8x4 latents, VAE factor 2
  # The same as decoding the chunk's latents in one call (latents / scaling_factor, then the decoder).
  plan = sample_chunks.plan_from_config(config)
  mesh = sample_job.local_mesh(2)
  run = sample_job.chunk_sampler(model_from_config(config.model), config, mesh)  # the job's, compiled already
  latents, _ = run(jax.device_put(params, sharding.replicated(mesh)), plan.labels(0),
                   jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), 0))
  decode = jax.jit(lambda p, z: vae_lib.images_from_latents(vae_lib.AutoencoderKL(TINY_VAE), p, z))
  direct = sample.to_uint8(decode(vae_weights.load_vae_params(vae_path, TINY_VAE), latents))
  assert np.abs(direct.astype(int) - images).max() <= 1 and (direct == images).mean() > 0.99
  with open(os.path.join(tmp_path, 'run', 'samples', 'sample_settings.json')) as f:
    assert json.load(f)['vae']['scaling_factor'] == 0.18215


def test_s_cross_flag_writes_a_report_without_changing_the_samples(uninterrupted, tmp_path):
  config, params, workdir, reference = uninterrupted
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  measured = config.copy_and_resolve_references()
  measured.sample.update(s_cross=True, s_cross_groups=4, s_cross_stages=(0.25, 0.5, 0.75))
  path = sample_job.sample_and_save(measured, copy, params, step=7)  # chunks 0 and 1 gain masses
  assert filecmp.cmp(path, reference, shallow=False)
  with open(os.path.join(copy, 'samples', 's_cross.json')) as f:
    report = json.load(f)
  assert report['branch'] == 'unconditional' and report['group_size'] == 4 and report['num_groups'] == 4
  assert report['stages'] == [0.25, 0.5, 0.75] and report['layers'] == [0]
  assert list(report['per_stage_percent']) == ['0.25', '0.5', '0.75'] and list(report['per_layer_percent']) == ['0']
  assert {stage: list(row) for stage, row in report['per_stage_layer_percent'].items()} == {
      '0.25': ['0'], '0.5': ['0'], '0.75': ['0']}
  values = np.array(list(report['per_stage_percent'].values()) + list(report['per_layer_percent'].values())
                    + [report['mean_percent']])
  assert ((values >= 0) & (values <= 100 * (1 - 1 / 3))).all() and report['mean_percent'] > 0  # max - mean of 3 shares
  assert 1 / 4 <= report['self_mass_fraction'] < 1 and sum(report['share_histogram']['counts']) == 3 * 4 * 4 * 3


def test_s_cross_needs_a_branch_that_attends_over_a_group(tmp_path):
  config = tiny_config(s_cross=True, cond_group_size=1, uncond_group_size=1)
  with pytest.raises(ValueError, match='no branch attends over a group'):
    sample_job.sample_and_save(config, str(tmp_path), {}, 0)
  late = tiny_config(s_cross=True, group_stage_fraction=0.2, s_cross_stages=(0.5,))
  with pytest.raises(ValueError, match='group attention is off'):
    sample_job.sample_and_save(late, str(tmp_path), {}, 0)


def test_eval_mode_needs_the_reference_and_graph_then_writes_results_beside_the_samples(uninterrupted, tmp_path,
                                                                                       monkeypatch):
  config, _, workdir, path = uninterrupted
  with pytest.raises(ValueError, match=r'eval\.reference_batch.*VIRTUAL_imagenet256.*eval\.inception_graph'):
    sample_job.evaluate_samples(config, workdir)
  config = config.copy_and_resolve_references()
  config.eval.reference_batch, config.eval.inception_graph = 'ref.npz', 'graph.pb'
  with pytest.raises(FileNotFoundError, match='mode=sample'):
    sample_job.evaluate_samples(config, str(tmp_path))
  calls = []
  monkeypatch.setattr(evaluator, 'evaluate', lambda *args, **kw: calls.append(args) or {'fid': 1.5,
                                                                                     'inception_score': 2.0})
  results, output = sample_job.evaluate_samples(config, workdir)
  assert calls == [('ref.npz', path, 'graph.pb')]
  assert output == path[:-4] + '.eval.json'
  with open(output) as f:
    assert json.load(f) == results == {'fid': 1.5, 'inception_score': 2.0}
