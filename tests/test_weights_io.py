"""Weight files: a missing, damaged or mismatched file gives one error naming the file (and the key).

Mismatched keys from in-memory state dicts are tested beside each importer
(test_convert.py, test_vae.py, test_encoders.py); here the errors of files.
"""

import dataclasses

import numpy as np
import pytest
import safetensors.numpy

from groupdiff_jax import weights_io
from groupdiff_jax.encoders import clip, dinov2, vae_weights
from tests import test_convert, test_encoders, test_vae


def truncated(tmp_path, name, state):
  """A weights file cut in half, as an interrupted download leaves it."""
  path = tmp_path / name
  if name.endswith('.safetensors'):
    safetensors.numpy.save_file(state, str(path))
  else:
    np.savez(path, **state)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  return path


@pytest.mark.parametrize('name', ['w.safetensors', 'w.npz'])
def test_missing_damaged_and_unknown_files(tmp_path, name):
  with pytest.raises(FileNotFoundError, match=f"No weights file at '{tmp_path}/none.npz'. Get it there."):
    weights_io.read_arrays(tmp_path / 'none.npz', 'Get it there.')
  path = truncated(tmp_path, name, {'a.weight': np.ones((64, 64), np.float32)})
  with pytest.raises(weights_io.WeightsImportError, match=f"'{path}' cannot be read.*truncated"):
    weights_io.read_arrays(path)
  (tmp_path / 'w.ckpt').write_bytes(b'x')
  with pytest.raises(weights_io.WeightsImportError, match='w.ckpt.*unknown weights format'):
    weights_io.read_arrays(tmp_path / 'w.ckpt')


def test_convert_names_the_file_and_the_key(tmp_path):
  with pytest.raises(FileNotFoundError, match='gone.pth.*--source'):
    test_convert.convert_file(tmp_path / 'gone.pth', tmp_path / 'out')
  sd = test_convert.official_state_dict()
  sd['blocks.1.mlp.fc1.weight'] = sd['blocks.1.mlp.fc1.weight'][:, :16]
  del sd['final_layer.linear.bias']
  path = test_convert.save(sd, tmp_path, 'safetensors')
  with pytest.raises(weights_io.WeightsImportError) as info:
    test_convert.convert_file(path, tmp_path / 'out')
  first_line, *rest = str(info.value).splitlines()
  assert str(path) in first_line
  assert '  blocks.1.mlp.fc1.weight: expected (128, 32), found (128, 16)' in rest
  assert any(line.startswith('  final_layer.linear.bias: expected (32,)') for line in rest)
  with pytest.raises(weights_io.WeightsImportError, match='truncated'):
    test_convert.convert_file(truncated(tmp_path, 'cut.safetensors', test_convert.official_state_dict()),
                              tmp_path / 'out')


def test_vae_file_errors_name_the_file_and_the_key(tmp_path):
  state = test_vae.random_state_dict(test_vae.TINY)
  del state['decoder.conv_out.bias']
  path = tmp_path / 'diffusion_pytorch_model.safetensors'
  safetensors.numpy.save_file(state, str(path))
  with pytest.raises(weights_io.WeightsImportError) as info:
    vae_weights.load_vae_params(tmp_path, test_vae.TINY)  # the directory: its diffusers file is named
  first_line, *rest = str(info.value).splitlines()
  assert str(path) in first_line and rest == ['missing keys (1):', '  decoder.conv_out.bias']
  with pytest.raises(weights_io.WeightsImportError, match='cut.safetensors.*truncated'):
    vae_weights.load_vae_params(truncated(tmp_path, 'cut.safetensors', state), test_vae.TINY)


@pytest.mark.parametrize('module, kind, repo', [(dinov2, 'dinov2', 'facebook/dinov2-large'),
                                                (clip, 'clip', 'openai/clip-vit-large-patch14')])
def test_encoder_file_errors_name_the_file_and_the_key(tmp_path, module, kind, repo):
  with pytest.raises(FileNotFoundError) as info:
    module.load_params(tmp_path)
  assert str(tmp_path / 'model.safetensors') in str(info.value) and repo in str(info.value)
  base = dinov2.DINOV2_L14 if kind == 'dinov2' else clip.CLIP_L14
  config = dataclasses.replace(base, projection_dim=16 if base.projection_dim else 0, **test_encoders.TINY)
  state = test_encoders.hf_state(kind, 2, np.random.default_rng(0))
  key = next(k for k in sorted(state) if k.endswith('fc2.weight'))
  state[key] = state[key][:, :5]
  safetensors.numpy.save_file(state, str(tmp_path / 'model.safetensors'))
  with pytest.raises(weights_io.WeightsImportError) as info:
    module.load_params(tmp_path, config)
  first_line, *rest = str(info.value).splitlines()
  assert str(tmp_path / 'model.safetensors') in first_line and any(line.startswith(f'  {key}:') for line in rest)


def test_non_finite_weights_are_refused_naming_file_and_key(tmp_path):
  path = tmp_path / 'w.npz'
  np.savez(path, good=np.ones(3, np.float32), bad=np.array([1.0, np.nan, np.inf], np.float32))
  with pytest.raises(weights_io.WeightsImportError, match=r"w.npz'?: 'bad' holds 2 non-finite"):
    weights_io.read_arrays(path)
