"""Watching a run: grids and FID in TensorBoard, the profiler trace, memory, the config.

A run's log as a file (no carriage returns, no TPU-probe noise): tests/test_launch_single_node.py.
"""

import glob
import io
import json
import os
import types

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from configs import digits, sit_xl
from groupdiff_jax import describe, platforms, run_log, sample_chunks, sample_job, train, train_monitor
from groupdiff_jax.models.dit import model_from_config
from tests import test_evaluation

# The digits demo shrunk (singles only: one step kind, one compilation; no neighbour search);
# 2 groups of 4 in the grids, Euler 2 steps.
TINY = {'model.depth': 1, 'model.hidden_size': 32, 'model.num_heads': 2, 'train.batch_size': 8,
        'train.log_every': 2, 'train.checkpoint_every': 100, 'train.group_ratio': 0.0, 'data.grouping': 'class',
        'sample.sampler': 'euler', 'sample.num_steps': 2, 'sample.num_groups': 2, 'sample.grid_groups': 2,
        'sample.groups_per_batch': 2}


def tiny_config(**overrides):
  config = digits.get_config()
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


def events(workdir):
  accumulator = event_accumulator.EventAccumulator(workdir, size_guidance={'images': 0, 'scalars': 0,
                                                                           'tensors': 0})
  accumulator.Reload()
  return accumulator


def tensor_values(accumulator, tag):
  """{step: value} of a scalar written through clu (TF2 summaries: tensors)."""
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
          for e in accumulator.Tensors(tag)}


def image_events(accumulator, tag):
  """{step: uint8 [H, W, C] decoded PNG} of an image summary (clu writes TF2 image tensors)."""
  out = {}
  for e in accumulator.Tensors(tag):
    encoded = tensor_util.make_ndarray(e.tensor_proto)  # [width, height, png...]
    out[e.step] = np.asarray(Image.open(io.BytesIO(encoded[2])))
  return out


@pytest.fixture(scope='module')
def grid_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('grid_run'))
  config = tiny_config(**{'train.num_steps': 6, 'train.sample_every': 2, 'train.profile_steps': (3, 5)})
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, state


def test_grids_are_in_the_events_and_progress_at_the_configured_steps(grid_run):
  config, workdir, _ = grid_run
  images = image_events(events(workdir), 'samples')
  assert sorted(images) == [2, 4, 6]
  side, per_row, rows = 16, 4, 2  # 16x16 digits, groups of 4, sample.grid_groups 2
  scale = 64 // side  # sample.grid_scale
  expected = (scale * (rows * (side + 1) + 1), scale * (per_row * (side + 1) + 1))
  for step, image in images.items():
    assert image.shape[:2] == expected
    png = np.asarray(Image.open(os.path.join(workdir, 'progress', f'step_{step}.png')))
    np.testing.assert_array_equal(png, image.reshape(png.shape))
  # The same noise and classes every time: the grids change only with the weights (which do change).
  assert not np.array_equal(images[2], images[6])


def test_the_grid_is_the_sample_jobs_sampler_with_fixed_noise(grid_run):
  config, _, state = grid_run
  monitor = train_monitor.TrainMonitor(config, 'unused', None, model_from_config(config.model), log=lambda *_: None)
  first, again = monitor.grid_images(state.ema_params), monitor.grid_images(state.ema_params)
  np.testing.assert_array_equal(first, again)
  assert first.shape == (2 * 4, 16, 16, 1) and first.dtype == np.uint8
  # The labels are those of the sample job's first chunk: group g has class g.
  plan = sample_chunks.plan_from_config(train_monitor._with_sample(config, num_groups=2, groups_per_batch=2))
  np.testing.assert_array_equal(plan.labels(0), np.repeat([0, 1], 4))


def test_profile_steps_leave_a_trace_in_the_workdir(grid_run):
  _, workdir, _ = grid_run
  traces = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_config_json_beside_the_checkpoints_and_key_value_lines(grid_run):
  config, workdir, _ = grid_run
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(config.to_dict()))
  lines = run_log.config_lines(config).splitlines()
  assert 'train.sample_every = 2' in lines and "model.variant = 'SiT-S/4'" in lines
  assert len(lines) == len(run_log.flat_config(config))


def test_one_steps_per_sec_per_logged_step(grid_run):
  _, workdir, _ = grid_run
  accumulator = events(workdir)
  assert sorted(tensor_values(accumulator, 'steps_per_sec')) == [2, 4, 6]
  assert 'uptime' not in accumulator.Tags()['tensors']


def test_fid_scalar_with_a_tiny_reference_and_a_standin_inception(tmp_path):
  graph = str(tmp_path / 'standin_graph_def.pb')
  test_evaluation._build_standin_graph(graph)
  reference = str(tmp_path / 'reference.npz')
  np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
  workdir = str(tmp_path / 'run')
  config = tiny_config(**{'train.num_steps': 2, 'train.eval_every': 2, 'eval.num_samples': 8,
                          'eval.reference_batch': reference, 'eval.inception_graph': graph})
  state = train.train_and_evaluate(config, workdir, write_samples=sample_job.sample_and_save)
  fids = tensor_values(events(workdir), 'fid_8')
  assert list(fids) == [2]
  with open(os.path.join(workdir, 'eval', 'step_2', 'fid.json')) as f:
    assert json.load(f)['fid_8'] == pytest.approx(fids[2], rel=1e-6)
  assert not glob.glob(os.path.join(workdir, 'eval', 'step_2', 'samples', '*.npz'))  # images removed
  # The same samples made by the sample job and scored by the ADM evaluator give the same FID.
  from groupdiff_jax.evaluation import evaluator
  config_8 = train_monitor._with_sample(config, num_groups=2)
  path = sample_job.sample_and_save(config_8, str(tmp_path / 'again'), state.ema_params, 2)
  expected = evaluator.evaluate(reference, path, graph)['fid']
  assert fids[2] == pytest.approx(expected, rel=1e-4)


def test_toy_fd_scalar_with_the_toy_evaluator(tmp_path):
  from configs import toy_table1
  from flax import serialization
  from groupdiff_jax.evaluation import fid, toy_features
  config = toy_table1.get_config()
  config.update_from_flattened_dict({
      'model.depth': 1, 'model.hidden_size': 32, 'model.num_heads': 2, 'train.batch_size': 8,
      'train.group_ratio': 0.0, 'train.num_steps': 2, 'train.log_every': 2, 'train.sample_every': 0,
      'train.eval_every': 2, 'data.num_images': 120, 'data.num_neighbors': 4, 'data.grouping': 'class',
      'eval.num_samples': 8, 'eval.toy_feature_steps': 3, 'sample.num_steps': 2, 'sample.num_groups': 2,
      'sample.groups_per_batch': 2})
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(config, workdir, write_samples=sample_job.sample_and_save)
  accumulator = events(workdir)
  fd, accuracy = tensor_values(accumulator, 'fd_toy_8'), tensor_values(accumulator, 'class_accuracy_8')
  assert list(fd) == [2] and list(accuracy) == [2]
  with open(os.path.join(workdir, 'eval', 'step_2', 'fd_toy.json')) as f:
    assert json.load(f)['fd_toy_8'] == pytest.approx(fd[2], rel=1e-6)
  # The same samples made by the sample job, scored with the saved net against the training images.
  with open(os.path.join(workdir, train_monitor.TOY_FEATURE_NET), 'rb') as f:
    saved = serialization.msgpack_restore(f.read())
  assert saved['trained_on']['num_images'] == 120 and saved['trained_on']['steps'] == 3
  featurize = toy_features.make_featurizer(saved['params'])
  images = train.make_batches(config).images
  reference = fid.FIDStatistics.from_features(featurize(images)[0])
  path = sample_job.sample_and_save(train_monitor._with_sample(config, num_groups=2), str(tmp_path / 'again'),
                                    state.ema_params, 2)
  with np.load(path) as f:
    expected = toy_features.score_samples(featurize, f['arr_0'], f['labels'], reference)
  assert fd[2] == pytest.approx(expected['fd'], rel=1e-4)
  assert accuracy[2] == pytest.approx(expected['class_accuracy'])
  # A saved net of other data (here: other steps) is trained again, not trusted.
  logged = []
  config.eval.toy_feature_steps = 4
  train_monitor.toy_scorer(config, workdir, log=lambda *args: logged.append(args[0] % args[1:]))
  assert any('trained on other data or steps' in line for line in logged)
  with open(os.path.join(workdir, train_monitor.TOY_FEATURE_NET), 'rb') as f:
    assert serialization.msgpack_restore(f.read())['trained_on']['steps'] == 4


def test_no_fid_without_a_reference_is_one_note():
  notes = []
  monitor = train_monitor.TrainMonitor(tiny_config(**{'train.eval_every': 5, 'train.sample_every': 0}), 'unused', None, None,
                                       log=lambda *a: notes.append(a[0] % a[1:]), write_samples=sample_job.sample_and_save)
  assert monitor.eval_every == 0 and len(notes) == 1 and 'eval.reference_batch' in notes[0]


def test_sit_xl_default_grid_costs_under_two_percent_of_training():
  config = sit_xl.get_config()
  cost = describe.grid_cost(config)
  assert config.train.sample_every > 0 and cost['ratio'] < 0.02
  # The ratio is the grid's FLOPs over sample_every cheapest train steps.
  assert cost['ratio'] == pytest.approx(cost['grid_flops'] / (config.train.sample_every * cost['train_step_flops']))


def test_sampling_flops_scale_with_nfe_and_guidance():
  base = tiny_config(**{'sample.sampler': 'euler', 'sample.num_steps': 10, 'sample.cond_group_size': 1,
                        'sample.uncond_group_size': 1})
  euler = describe.sampling_flops(base, 8)
  heun = describe.sampling_flops(train_monitor._with_sample(base, sampler='heun'), 8)
  no_cfg = describe.sampling_flops(train_monitor._with_sample(base, cfg_scale=1.0), 8)
  assert heun == 2 * euler  # Heun evaluates the model twice per step
  assert no_cfg * 2 == euler  # CFG adds an unconditional branch of the same cost (both groups of 1)
  assert describe.sampling_flops(base, 16) == 2 * euler
  assert describe.sampling_flops(train_monitor._with_sample(base, sampler='dopri5'), 8) is None


def test_memory_scalars_take_the_largest_device_and_skip_backends_without_stats():
  fake = lambda stats: types.SimpleNamespace(memory_stats=lambda: stats)
  devices = [fake({'bytes_in_use': 2**30, 'peak_bytes_in_use': 3 * 2**30}),
             fake({'bytes_in_use': 2**31, 'peak_bytes_in_use': 2**31})]
  assert run_log.memory_scalars(devices) == {'memory_in_use_gib': 2.0, 'memory_peak_gib': 3.0}
  assert run_log.memory_scalars([fake(None)]) == {}
  assert run_log.memory_scalars() == ({} if jax.default_backend() == 'cpu' else
                                            run_log.memory_scalars(jax.local_devices()))


def test_profile_steps_are_checked():
  with pytest.raises(ValueError, match='profile_steps'):
    train_monitor.TrainMonitor(tiny_config(**{'train.profile_steps': (5, 5)}), 'unused', None, None)


def test_tpu_probe_is_skipped_only_without_a_tpu_and_without_jax_platforms(tmp_path):
  (tmp_path / 'accel0').write_text('')
  assert platforms.skip_tpu_probe_without_tpu({'JAX_PLATFORMS': 'cpu'}, (str(tmp_path / 'none*'),)) is None
  assert platforms.skip_tpu_probe_without_tpu({}, (str(tmp_path / 'accel*'),)) is None  # a TPU host
  (tmp_path / 'nvidiactl').write_text('')
  none, gpu = (str(tmp_path / 'none*'),), (str(tmp_path / 'nvidiactl'),)
  assert platforms.default_platforms({}, none, gpu) == 'cuda,cpu'  # a GPU host
  assert platforms.default_platforms({}, none, none) == 'cpu'  # neither: no CUDA plugin start is tried


def test_latent_models_without_a_vae_get_no_grids_and_no_fid_with_one_note_each(tmp_path):
  config = sit_xl.get_config()
  config.update_from_flattened_dict({'train.eval_every': 10, 'eval.reference_batch': str(tmp_path / 'ref.npz'),
                                     'eval.inception_graph': str(tmp_path / 'graph.pb')})
  notes = []
  monitor = train_monitor.TrainMonitor(config, 'unused', None, None, log=lambda *a: notes.append(a[0] % a[1:]),
                                       write_samples=sample_job.sample_and_save)
  assert monitor.sample_every == 0 and monitor.eval_every == 0
  assert len(notes) == 2 and all('sample.vae_path' in note for note in notes)


def test_without_a_sample_writer_there_are_no_scores_with_one_note(tmp_path):
  notes = []
  config = tiny_config(**{'train.eval_every': 5, 'train.sample_every': 0,
                          'eval.reference_batch': str(tmp_path / 'ref.npz'),
                          'eval.inception_graph': str(tmp_path / 'graph.pb')})
  monitor = train_monitor.TrainMonitor(config, 'unused', None, None, log=lambda *a: notes.append(a[0] % a[1:]))
  assert monitor.eval_every == 0 and len(notes) == 1 and 'sample writer' in notes[0]
