"""launch/tpu_pod.sh's control flow against a recording stand-in for gcloud (tests/fake_gcloud.py).

This tests the script's logic only (what it calls, in which order, and what
it does with each outcome); no TPU VM or real gcloud is involved.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch', 'tpu_pod.sh')
ENV = {'ZONE': 'z1', 'ACCELERATOR': 'v4-16', 'NAME': 'qr', 'BUCKET': 'gs://b', 'CONFIG': 'configs/digits.py',
       'POLL_SECONDS': '0', 'RETRY_SECONDS': '0'}


def run_script(tmp_path, states, runs, args=(), **env):
  fake = tmp_path / 'fake'
  fake.mkdir()
  (fake / 'states').write_text(''.join(s + '\n' for s in states))
  (fake / 'runs').write_text(''.join(f'{r}\n' for r in runs))
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(f'#!/bin/sh\nexec {sys.executable} {os.path.join(ROOT, "tests", "fake_gcloud.py")} "$@"\n')
  gcloud.chmod(0o755)
  environment = {**os.environ, **ENV, **env, 'FAKE_GCLOUD_DIR': str(fake), 'TMPDIR': str(tmp_path),
                 'PATH': f'{bin_dir}:{os.environ["PATH"]}'}
  result = subprocess.run(['bash', SCRIPT, *args], env=environment, capture_output=True, text=True, timeout=120)
  calls = [json.loads(line) for line in (fake / 'calls').read_text().splitlines()] if (fake / 'calls').exists() else []
  return result, calls


def verb(call):
  """A call as a short name: 'describe', 'create', 'delete', 'scp', 'install' or 'run'."""
  if call[2] == 'queued-resources':
    return call[3]
  if call[3] == 'scp':
    return 'scp'
  command = next(a for a in call if a.startswith('--command='))
  return 'run' if 'groupdiff_jax.main' in command else 'install'


def test_create_wait_install_run_and_resume_after_each_kind_of_preemption(tmp_path):
  # describe outcomes in call order: create's check, two waits, after-run report, ...
  states = ['MISSING', 'WAITING', 'ACTIVE',   # attempt 0: create, wait until ACTIVE
            'ACTIVE',                         # report after the run's exit 75
            'ACTIVE',                         # attempt 1: still ACTIVE, reused
            'SUSPENDED',                      # report after ssh's 255
            'SUSPENDED', 'WAITING', 'ACTIVE']  # attempt 2: delete, create, wait
  result, calls = run_script(tmp_path, states, runs=[75, 255, 0], args=['--config.train.num_steps=7'])
  assert result.returncode == 0, result.stderr
  assert [verb(c) for c in calls] == [
      'describe', 'create', 'describe', 'describe', 'scp', 'install', 'run', 'describe',
      'describe', 'scp', 'install', 'run', 'describe',
      'describe', 'delete', 'create', 'describe', 'describe', 'scp', 'install', 'run']
  for call in calls:
    assert '--zone=z1' in call
    if verb(call) in ('scp', 'install', 'run'):
      assert '--worker=all' in call
  create = calls[1]
  assert '--accelerator-type=v4-16' in create and '--spot' in create and '--node-id=qr' in create
  run_command = next(a for a in calls[6] if a.startswith('--command='))
  assert 'JAX_DISTRIBUTED_AUTO=1 python -m groupdiff_jax.main --config=configs/digits.py --workdir=gs://b/qr' in run_command
  assert run_command.rstrip().endswith('--config.train.num_steps=7')  # overrides pass through
  out = result.stdout
  assert 'waiting for qr: WAITING' in out
  assert 'preempted, checkpoint saved' in out and 'ssh lost the workers' in out
  assert out.count('done: gs://b/qr') == 1 and out.rstrip().endswith('done: gs://b/qr')


def test_stops_after_max_restarts_without_done(tmp_path):
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[75, 75, 75], MAX_RESTARTS='2')
  assert result.returncode == 1
  assert [verb(c) for c in calls].count('run') == 3  # the first run and 2 restarts
  assert 'done' not in result.stdout
  assert 'giving up after 2 restarts' in result.stderr


def test_user_error_is_not_retried(tmp_path):
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[2])
  assert result.returncode == 2
  assert [verb(c) for c in calls] == ['describe', 'scp', 'install', 'run']
  assert 'done' not in result.stdout and 'not retrying' in result.stderr


def test_an_interrupted_run_is_not_retried(tmp_path):
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[130])
  assert result.returncode == 130
  assert [verb(c) for c in calls] == ['describe', 'scp', 'install', 'run']
  assert 'done' not in result.stdout and 'run interrupted (Ctrl-C); not retrying' in result.stderr


@pytest.mark.parametrize('missing', ['ZONE', 'ACCELERATOR', 'NAME', 'BUCKET'])
def test_missing_variable(tmp_path, missing):
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[], **{missing: ''})
  assert result.returncode == 2 and calls == []
  assert f'Error: {missing} is not set' in result.stderr and 'ZONE=us-central2-b' in result.stderr


def test_help(tmp_path):
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[], args=['--help'], ZONE='')
  assert result.returncode == 0 and calls == []
  assert 'MAX_RESTARTS' in result.stdout and 'POLL_SECONDS' in result.stdout


def test_xl_configs_get_the_pods_mesh_before_the_users_overrides(tmp_path):
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[0], args=['--config.train.num_steps=10'],
                             ACCELERATOR='v5e-64', CONFIG='configs/sit_xl.py')
  assert result.returncode == 0, result.stderr
  assert 'mesh for v5e-64 at batch 256: --config.mesh.data=-1 --config.mesh.fsdp=4' in result.stdout
  command = next(a for a in calls[-1] if a.startswith('--command='))
  assert command.rstrip().endswith('--config.mesh.data=-1 --config.mesh.fsdp=4 --config.train.num_steps=10')


@pytest.mark.parametrize('own', [['--config.mesh.fsdp=8'], ['--config.model.remat=full'],
                                 ['--config.train.group_size=16']])
def test_a_mesh_or_variant_of_the_users_turns_the_preset_off(tmp_path, own):
  # The preset sets the whole mesh for GroupDiff-l-4: beside a hand-set axis its other axis could leave a mesh
  # that does not multiply out (data=-1 with fsdp=8 is fine; a preset fsdp=4 with the user's data=64 is not).
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[0], args=own, ACCELERATOR='v5e-64',
                             CONFIG='configs/sit_xl.py')
  assert result.returncode == 0, result.stderr
  assert f"mesh preset off: {own[0].split('=')[0]} is given" in result.stdout
  command = next(a for a in calls[-1] if a.startswith('--command='))
  assert command.rstrip().endswith(own[0]) and command.count('--config.mesh') == own[0].count('--config.mesh')


def test_the_batch_in_two_argument_form_and_overrides_with_spaces_reach_the_workers_intact(tmp_path):
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[0], ACCELERATOR='v5e-256', CONFIG='configs/sit_xl.py',
                             args=['--config.train.batch_size', '1024', '--config.sample.vae_path=/w/a b.safetensors'])
  assert result.returncode == 0, result.stderr
  assert 'mesh for v5e-256 at batch 1024' in result.stdout
  command = next(a for a in calls[-1] if a.startswith('--command='))
  assert r'--config.sample.vae_path=/w/a\ b.safetensors' in command  # one argument for the remote shell


def test_the_batch_from_the_command_line_picks_the_row(tmp_path):
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[0], args=['--config.train.batch_size=1024'],
                             ACCELERATOR='v5e-256', CONFIG='configs/dit_xl.py')
  assert result.returncode == 0, result.stderr
  command = next(a for a in calls[-1] if a.startswith('--command='))
  assert '--config.mesh.fsdp=4 --config.train.batch_size=1024' in command


def test_a_pod_the_table_has_no_entry_for_runs_the_official_batch_with_the_configs_mesh(tmp_path):
  # v5e-256 at batch 256 needs a group split over 4 devices, which the config's defaults pick (mesh.group=0);
  # the table's refusal path (NoMesh) is tested in tests/test_pod_meshes.py.
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[0], ACCELERATOR='v5e-256', CONFIG='configs/sit_xl.py')
  assert result.returncode == 0, result.stderr
  command = next(a for a in calls[-1] if a.startswith('--command='))
  assert 'configs/sit_xl.py' in command and '--config.mesh' not in command


def test_no_mesh_flags_for_other_configs_unknown_pods_or_mesh_preset_0(tmp_path):
  for i, env in enumerate([dict(CONFIG='configs/digits.py', ACCELERATOR='v5e-64'),
                           dict(CONFIG='configs/sit_xl.py', ACCELERATOR='v5p-8'),
                           dict(CONFIG='configs/sit_xl.py', ACCELERATOR='v5e-64', MESH_PRESET='0')]):
    (tmp_path / str(i)).mkdir()
    result, calls = run_script(tmp_path / str(i), ['ACTIVE'], runs=[0], **env)
    assert result.returncode == 0, result.stderr
    command = next(a for a in calls[-1] if a.startswith('--command='))
    assert '--config.mesh' not in command and "''" not in command  # no empty argument without overrides


def test_latents_from_a_bucket_are_copied_to_every_worker_and_passed_as_local_paths(tmp_path):
  result, calls = run_script(tmp_path, ['ACTIVE'], runs=[0], LATENTS_URI='gs://b/latents',
                             NEIGHBORS_URI='gs://b/neighbors', LOCAL_DATA='/data/gd', CONFIG='configs/digits.py')
  assert result.returncode == 0, result.stderr
  install = next(a for call in calls for a in call if a.startswith('--command=') and 'pip install' in a)
  assert 'gcloud storage rsync -r gs://b/latents /data/gd/latents' in install
  assert 'gcloud storage rsync -r gs://b/neighbors /data/gd/neighbors' in install
  command = next(a for a in calls[-1] if a.startswith('--command='))
  assert '--config.data.latent_dir=/data/gd/latents --config.data.neighbors_dir=/data/gd/neighbors' in command
