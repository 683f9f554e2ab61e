"""A user's mistake in sampling, evaluation, the model config or a file is a UserError (one message, exit 2).

Every check here is reachable from a config value, a flag or a file; each
test asserts the class and that the message names the value or file. The
CLI tests run `groupdiff_jax.main`'s command line in this process (one of
them from another working directory, without the repository on sys.path) and
assert exit code 2 and exactly one `Error:` line, the whole output. Internal invariants (shapes the code
builds itself) keep the built-in exceptions: the last tests check that.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from groupdiff_jax import (checkpoint, convert, distributed, errors, sample, sample_chunks, sample_job, samplers,
                           transport, weights_io)
from groupdiff_jax.data import shards, tfds_source
from groupdiff_jax.evaluation import evaluator, fid, inception, s_cross
from groupdiff_jax.models import dit, embeddings, group_attention
from tests import cli_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**sample_fields):
  config = digits.get_config()
  config.model.update(depth=1, hidden_size=32, num_heads=2, input_size=8, variant='SiT-S/2')
  config.sample.update(sampler='euler', num_steps=2, num_groups=2, images_per_group=4, groups_per_batch=2)
  config.sample.update(**sample_fields)
  return config


def uint8_images(n, side=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


# --- The command line: exit 2, one message, no traceback ------------------------------------------------------
# In this process (tests/cli_in_process.py): an uncaught exception (a traceback) fails pytest.raises(SystemExit).
def run_digits(capsys, workdir, *flags):
  return cli_in_process.run_main(capsys, f'--config={ROOT}/configs/digits.py', f'--workdir={workdir}', *flags)


def assert_one_error(result, *names):
  code, _, stderr = result
  assert code == errors.EXIT_USER_ERROR, stderr[-3000:]
  lines = stderr.rstrip('\n').splitlines()
  assert len(lines) == 1 and lines[0].startswith('Error: '), stderr[-3000:]
  for name in names:
    assert name in lines[0], lines[0]
  return lines[0]


def test_cli_sampling_with_a_sampler_of_the_other_objective(tmp_path, capsys):
  # Checked before any checkpoint is looked for (the workdir is empty).
  result = run_digits(capsys, tmp_path / 'run', '--mode=sample', '--config.sample.sampler=ddpm')
  assert_one_error(result, "sample.sampler='ddpm'", 'model.objective')


def test_cli_eval_with_a_reference_without_images_or_statistics(tmp_path, capsys):
  workdir = tmp_path / 'run'
  os.makedirs(workdir / 'samples')
  np.savez(workdir / 'samples' / 'samples_8x8x8x3.npz', arr_0=uint8_images(8))
  reference = str(tmp_path / 'reference.npz')
  np.savez(reference, labels=np.arange(8))
  graph = tmp_path / 'graph.pb'
  graph.write_bytes(b'not read: the reference is refused first')
  result = run_digits(capsys, workdir, '--mode=eval', f'--config.eval.reference_batch={reference}',
                      f'--config.eval.inception_graph={graph}')
  assert_one_error(result, reference, "'arr_0' images or precomputed statistics")


def test_cli_training_with_an_unknown_attention_impl(tmp_path, capsys):
  result = run_digits(capsys, tmp_path / 'run', '--config.model.attention_impl=flashy', '--config.train.num_steps=1')
  assert_one_error(result, "model.attention_impl='flashy'", 'auto')


def test_cli_a_config_file_that_does_not_exist_names_it_and_the_shipped_configs(tmp_path, capsys):
  result = cli_in_process.run_main(capsys, '--config=configs/digitz.py', f'--workdir={tmp_path}')
  line = assert_one_error(result, '--config=configs/digitz.py: no such file', 'digits.py, dit_b.py')
  assert line.endswith(f'did you mean {os.path.join(ROOT, "configs", "digits.py")}?')
  assert 'pod_meshes.py' not in line  # a helper module of configs/, not a config


def test_cli_a_config_file_without_get_config(tmp_path, capsys):
  path = tmp_path / 'settings.py'
  path.write_text('batch_size = 64\n')
  result = cli_in_process.run_main(capsys, f'--config={path}', f'--workdir={tmp_path}')
  assert_one_error(result, f'{path} defines no get_config()', 'digits.py')


def test_cli_a_key_error_inside_a_config_file_is_its_bug_with_a_traceback(tmp_path, capsys):
  path = tmp_path / 'broken.py'
  path.write_text('def get_config():\n  return {}["model"]\n')
  with pytest.raises(KeyError, match='model'):  # not reported as an unknown field
    cli_in_process.run_main(capsys, f'--config={path}', f'--workdir={tmp_path}')


def test_cli_a_key_error_while_a_config_file_imports_keeps_its_traceback_even_with_overrides(tmp_path, capsys):
  path = tmp_path / 'broken_import.py'
  path.write_text('SIZES = {}\nDEPTH = SIZES["depth"]\n\n\ndef get_config():\n  return None\n')
  with pytest.raises(KeyError, match='depth'):  # not the one-line error of an unknown --config.x
    cli_in_process.run_main(capsys, f'--config={path}', f'--workdir={tmp_path}', '--config.model.depth=2')


def test_cli_a_config_without_the_default_fields_names_them(tmp_path, capsys):
  path = tmp_path / 'scratch.py'
  path.write_text('import ml_collections\n\n\ndef get_config():\n  config = ml_collections.ConfigDict()\n'
                  '  config.seed = 0\n  config.colour = "red"\n  return config\n')
  result = cli_in_process.run_main(capsys, f'--config={path}', f'--workdir={tmp_path}')
  assert_one_error(result, f'--config={path}', 'lacks compile.', 'compile.headroom', 'has colour',
                   'from configs import default')


def test_cli_a_misspelled_field_names_the_nearest_fields_unescaped(tmp_path, capsys):
  result = run_digits(capsys, tmp_path, '--config.train.num_stepz=10')
  line = assert_one_error(result, '--config.train.num_stepz=10', "no field 'num_stepz'", 'did you mean train.num_steps',
                          'configs/default.py')
  assert '\\' not in line
  result = run_digits(capsys, tmp_path, '--config.trian.num_steps=10')  # a misspelled section
  assert_one_error(result, "the config has no field 'trian'; did you mean train?")


def test_cli_a_batch_of_partial_groups_names_the_nearest_valid_sizes(tmp_path, capsys):
  result = run_digits(capsys, tmp_path / 'run', '--config.train.batch_size=18')  # groups of 4
  assert_one_error(result, 'train.batch_size=18', 'train.group_size=4', '16 and 20')


def test_cli_help_exits_0_and_points_to_the_default_config(capsys):
  code, stdout, _ = cli_in_process.run_main(capsys, '--help')
  assert code == 0
  assert 'configs/default.py lists every field' in ' '.join(stdout.split())  # the --config flag's help


def test_cli_a_config_outside_the_repository_builds_on_a_shipped_one(tmp_path, capsys, monkeypatch):
  # Run from elsewhere with no path to the repository root on sys.path (as for an installed package) and no
  # `configs` imported yet: the user's config imports configs.digits, which imports configs.default.
  (tmp_path / 'mine.py').write_text('from configs import digits\n\n\ndef get_config():\n'
                                    '  config = digits.get_config()\n  config.train.batch_size = 18\n'
                                    '  return config\n')
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, 'path', [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(),
                                                                                          'configs'))])
  loaded = {name: module for name, module in sys.modules.items() if name == 'configs' or name.startswith('configs.')}
  for name in loaded:
    monkeypatch.delitem(sys.modules, name)
  try:
    with pytest.raises(ModuleNotFoundError):  # what the config alone would meet
      __import__('configs')
    result = cli_in_process.run_main(capsys, '--config=mine.py', '--workdir=run')
  finally:  # the modules of this test's import go; the run's own come back (monkeypatch)
    for name in [n for n in sys.modules if n == 'configs' or n.startswith('configs.')]:
      del sys.modules[name]
  assert_one_error(result, 'train.batch_size=18')


# --- Config values --------------------------------------------------------------------------------------------
@pytest.mark.parametrize('fields, names', [
    (dict(sampler='ddpm'), ["sample.sampler='ddpm'"]),
    (dict(cond_group_size=0), ['sample.cond_group_size=0']),  # was a ZeroDivisionError
    (dict(uncond_group_size=3), ['sample.images_per_group=4', 'sample.uncond_group_size=3']),
    (dict(uncond_group_size=4, images_per_group=8, cond_group_size=8), ['sample.cond_group_size=8',
                                                                         'model.max_group_size=4']),
    (dict(num_groups=0), ['sample.num_groups=0']),
    (dict(s_cross=True, cond_group_size=1, uncond_group_size=1), ['sample.s_cross=True']),
])
def test_sample_config_mistakes_are_config_errors(fields, names):
  config = tiny_config(**fields)
  config.model.max_group_size = 4
  with pytest.raises(errors.ConfigError) as error:
    sample_job.check_config(config)
  for name in names:
    assert name in str(error.value)


def test_dit_respacing_that_cannot_work_names_the_field():
  config = tiny_config(num_steps=2000)  # more than DiT's 1000 steps
  with pytest.raises(errors.ConfigError, match='sample.num_steps'):
    sample.dit_schedule(config.sample)
  config.sample.timestep_respacing = 'ddim999'  # stride 1 takes 1000 of the 1000 steps, stride 2 takes 500
  with pytest.raises(errors.ConfigError, match="sample.timestep_respacing.*'ddim999'"):
    sample.dit_schedule(config.sample)
  assert sample.dit_schedule(tiny_config(num_steps=250).sample).num_timesteps == 250


def test_a_latent_model_without_its_vae_file(tmp_path):
  config = tiny_config()
  config.model.in_channels = 4
  with pytest.raises(errors.ConfigError, match='sample.vae_path'):
    sample_job.check_config(config)
  config.sample.vae_path = str(tmp_path / 'vae.safetensors')
  with pytest.raises(errors.MissingInputError, match='vae.safetensors'):
    sample_job.check_config(config)


@pytest.mark.parametrize('field, value', [
    ('attention_impl', 'flashy'), ('remat', 'some'), ('dtype', 'float16'), ('time_convention', 'reversed'),
    ('variant', 'SiT-M/3'),
])
def test_model_config_mistakes_fail_when_the_model_is_built(field, value):
  config = tiny_config().model
  config[field] = value
  with pytest.raises(errors.ConfigError, match=repr(value)):
    dit.model_from_config(config)


@pytest.mark.parametrize('field, value', [('path', 'curvy'), ('prediction', 'x0'), ('loss_weight', 'snr')])
def test_transport_config_mistakes(field, value):
  with pytest.raises(errors.ConfigError, match=f"model.{field}='{value}'"):
    transport.Transport(**{field: value})


def test_sde_settings_and_embedding_width_are_config_errors():
  with pytest.raises(errors.ConfigError, match="sample.sde_diffusion_form='wide'"):
    samplers.sde_diffusion(transport.Transport(), jnp.float32(0.5), form='wide')
  with pytest.raises(errors.ConfigError, match="sample.sde_last_step='Last'"):
    samplers.integrate_sde(None, jnp.zeros((1, 2, 2, 1)), jax.random.PRNGKey(0), 2, last_step='Last')
  with pytest.raises(errors.ConfigError, match='model.hidden_size=30'):
    embeddings.sincos_2d_position_embedding(30, 2)
  with pytest.raises(errors.ConfigError, match='flashy'):
    group_attention.resolve_implementation('flashy', jnp.float32)


def test_input_of_another_resolution_than_model_input_size():
  model = dit.model_from_config(tiny_config().model)  # input_size 8
  with pytest.raises(errors.ConfigError, match='16x16 but model.input_size=8'):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((4, 16, 16, 1)), jnp.zeros(4),
                   jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32))


def test_coordinator_address_without_process_count(monkeypatch):
  for name in (distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(errors.ConfigError, match='--coordinator_address=host:1234 needs --num_processes'):
    distributed.initialize('host:1234')


# --- Files: samples, reference batch, graph, checkpoints ---------------------------------------------------------
def eval_config(tmp_path, reference='ref.npz', graph='graph.pb'):
  config = tiny_config()
  config.eval.reference_batch = str(tmp_path / reference) if reference else None
  config.eval.inception_graph = str(tmp_path / graph) if graph else None
  return config


def test_eval_mode_without_paths_or_samples(tmp_path):
  with pytest.raises(errors.ConfigError, match='--config.eval.reference_batch=.*--config.eval.inception_graph='):
    sample_job.evaluate_samples(eval_config(tmp_path, None, None), str(tmp_path))
  with pytest.raises(errors.MissingInputError, match='No samples_\\*.npz.*--mode=sample'):
    sample_job.evaluate_samples(eval_config(tmp_path), str(tmp_path))
  os.makedirs(tmp_path / 'samples')
  for n in (4, 8):
    np.savez(tmp_path / 'samples' / f'samples_{n}x8x8x3.npz', arr_0=uint8_images(n))
  with pytest.raises(errors.DataError, match='Several sample batches'):
    sample_job.evaluate_samples(eval_config(tmp_path), str(tmp_path))


def test_reference_and_sample_files_that_cannot_be_evaluated(tmp_path):
  graph = str(tmp_path / 'graph.pb')
  open(graph, 'wb').close()  # only its existence is checked before the files
  samples = str(tmp_path / 'samples.npz')
  np.savez(samples, arr_0=uint8_images(8))
  not_npz = str(tmp_path / 'text.npz')
  with open(not_npz, 'w') as f:
    f.write('hello')
  with pytest.raises(errors.DataError, match='text.npz: not an .npz'):
    fid.maybe_load(not_npz)  # was numpy's pickle ValueError without the file's role
  with pytest.raises(errors.MissingInputError, match='absent.npz'):
    evaluator.evaluate(str(tmp_path / 'absent.npz'), samples, graph)
  no_stats = str(tmp_path / 'no_stats.npz')
  np.savez(no_stats, labels=np.arange(3))
  with pytest.raises(errors.DataError, match='no_stats.npz: no FID statistics'):
    fid.FIDStatistics.load(no_stats)
  bad_stats = str(tmp_path / 'bad_stats.npz')
  np.savez(bad_stats, mu=np.zeros(3), sigma=np.zeros((3, 2)))
  with pytest.raises(errors.DataError, match=r'bad_stats.npz: mu/sigma must be \[D\] and \[D, D\]'):
    fid.maybe_load(bad_stats)
  small = str(tmp_path / 'small.npz')
  np.savez(small, arr_0=uint8_images(3))  # 3 images: precision/recall with k = 3 need 4
  with pytest.raises(errors.DataError, match='small.npz: 3 reference images'):
    evaluator.evaluate(small, samples, graph)
  with pytest.raises(errors.MissingInputError, match='--config.eval.inception_graph'):
    inception.check_graph_path(str(tmp_path / 'missing.pb'))


def test_evaluator_cli_keeps_the_traceback_of_a_bug(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise ValueError('an internal shape bug')
  monkeypatch.setattr(evaluator, 'evaluate', broken)
  with pytest.raises(ValueError, match='internal shape bug'):
    evaluator.main([str(tmp_path / 'a.npz'), str(tmp_path / 'b.npz')])


def test_missing_checkpoints_and_weights_files(tmp_path):
  with pytest.raises(errors.MissingInputError, match='No checkpoint in .*--mode=train'):
    checkpoint.load_params(str(tmp_path / 'run'))
  with pytest.raises(errors.MissingInputError, match='train.init_from=.*no checkpoint directory'):
    checkpoint.init_params_from(None, str(tmp_path / 'nowhere'))
  with pytest.raises(errors.MissingInputError, match='--source'):
    convert.read_checkpoint(str(tmp_path / 'official.pth'))


def test_error_classes_of_files_keep_their_old_bases():
  for cls, old in ((checkpoint.NoRestorableCheckpoint, RuntimeError), (sample_chunks.SamplesDirError, RuntimeError),
                   (tfds_source.DatasetNotReady, RuntimeError), (shards.ShardError, RuntimeError),
                   (weights_io.WeightsImportError, ValueError)):
    assert issubclass(cls, errors.UserError) and issubclass(cls, old), cls


# --- Bugs keep the built-in exception (and main's traceback) --------------------------------------------------
def test_internal_invariants_stay_builtin_errors():
  with pytest.raises(ValueError) as error:
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
  assert not isinstance(error.value, errors.UserError)
  with pytest.raises(ValueError) as error:
    group_attention.to_groups(jnp.zeros((6, 2, 1)), 4)
  assert not isinstance(error.value, errors.UserError)
  with pytest.raises(ValueError) as error:
    transport.path_coefficients('curvy', jnp.float32(0.5))  # Transport() validates first
  assert not isinstance(error.value, errors.UserError)
  with pytest.raises(ValueError) as error:
    s_cross.s_cross_branch(tiny_config(cond_group_size=1, uncond_group_size=1).sample)
  assert isinstance(error.value, errors.ConfigError)  # config-reachable: converted


@pytest.mark.parametrize('text', ['{"num_rows": 1', '[1, 2]'])
def test_an_unreadable_job_file_of_a_sharded_job_is_named(tmp_path, text):
  (tmp_path / 'job.json').write_text(text)
  with pytest.raises(shards.ShardError, match=r'job\.json.*--output_dir'):
    shards.ShardedJob(str(tmp_path), {'encoder': 'x'}, num_rows=4, shard_size=2)


@pytest.mark.parametrize('text, problem', [('{"encoder": ', r'not a readable JSON file \(.*\)'),
                                           ('["dinov2"]', 'holds a JSON list, not an object')])
def test_an_unreadable_embeddings_meta_is_named(tmp_path, text, problem):
  from groupdiff_jax.data import neighbors_job
  rows = np.eye(4, 8, dtype=np.float32)
  np.save(tmp_path / 'embeddings.npy', rows)
  (tmp_path / 'meta.json').write_text(text)
  with pytest.raises(errors.UserError, match=rf'meta\.json: {problem}; rewrite it with the embedding job'):
    neighbors_job.load_embeddings(str(tmp_path))


@pytest.mark.parametrize('num_neighbors', [0, 10])
def test_more_neighbours_than_the_in_memory_dataset_holds_is_a_config_error(num_neighbors):
  from groupdiff_jax.data import array_batches
  with pytest.raises(errors.ConfigError, match=rf'data\.num_neighbors={num_neighbors} must be between 1 and 9'):
    array_batches.neighbor_lists(np.eye(10, 4, dtype=np.float32), num_neighbors)
