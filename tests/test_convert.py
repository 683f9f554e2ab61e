"""Checkpoint import: official DiT / SiT / REPA / GroupDiff state dicts -> our Flax DiT.

The state dicts are generated here from the architecture description
(official DiT `models.py`, timm `Attention`/`Mlp`/`PatchEmbed`, GroupDiff's
`Denoiser`, REPA's `SiT`), not from the converter's rename table, and the
converted model is compared with a NumPy forward pass written on the
ORIGINAL PyTorch layout (NCHW, Linear [out, in], conv OIHW), so a wrong
transpose or a swapped name fails here.
"""

import json
import math
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from groupdiff_jax import convert, converted, weights_io
from groupdiff_jax.models import dit
from tests import reference_dit

TINY = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=5)
OVERRIDES = dict(depth=2, hidden_size=32, num_heads=4)  # on top of a /2 variant, for convert_checkpoint


def tiny_model(learn_sigma=True, max_group_size=4):
  return dit.DiT(**TINY, learn_sigma=learn_sigma, max_group_size=max_group_size)


# ---------------------------------------------------------------- official layout, from the architecture


def official_state_dict(seed=0, *, depth=2, hidden=32, patch=2, in_ch=4, classes=5, input_size=8,
                        learn_sigma=True, max_group_size=4, repa_projectors=False):
  """A random state dict with the key names and PyTorch shapes of the official modules."""
  rng = np.random.default_rng(seed)
  sd = {}

  def rand(*shape, std):
    return (std * rng.standard_normal(shape)).astype(np.float32)

  def linear(name, fan_in, fan_out):  # torch.nn.Linear: weight [out, in]
    sd[f'{name}.weight'] = rand(fan_out, fan_in, std=1 / math.sqrt(fan_in))
    sd[f'{name}.bias'] = rand(fan_out, std=0.1)

  c = hidden
  out_ch = in_ch * (2 if learn_sigma else 1)
  sd['x_embedder.proj.weight'] = rand(c, in_ch, patch, patch, std=0.5)  # Conv2d: [out, in, kh, kw]
  sd['x_embedder.proj.bias'] = rand(c, std=0.1)
  sd['pos_embed'] = reference_dit.pos_embed(c, input_size // patch)[None].astype(np.float32)  # [1, T, C]
  linear('t_embedder.mlp.0', 256, c)
  linear('t_embedder.mlp.2', c, c)
  sd['y_embedder.embedding_table.weight'] = rand(classes + 1, c, std=0.3)  # + the null class
  if max_group_size:
    sd['sample_embedder.embedding_table.weight'] = rand(max_group_size, c, std=0.3)  # no null row
  for i in range(depth):
    linear(f'blocks.{i}.attn.qkv', c, 3 * c)
    linear(f'blocks.{i}.attn.proj', c, c)
    linear(f'blocks.{i}.mlp.fc1', c, 4 * c)
    linear(f'blocks.{i}.mlp.fc2', 4 * c, c)
    linear(f'blocks.{i}.adaLN_modulation.1', c, 6 * c)
  linear('final_layer.linear', c, patch * patch * out_ch)
  linear('final_layer.adaLN_modulation.1', c, 2 * c)
  if repa_projectors:  # REPA build_mlp: Linear, SiLU, Linear, SiLU, Linear
    linear('projectors.0.0', c, 64)
    linear('projectors.0.2', 64, 64)
    linear('projectors.0.4', 64, 48)
  return sd


def official_forward(sd, x, t, y, sample_ids, *, patch, num_heads, group_size=1):
  """Official DiT/GroupDiff forward on the PyTorch-layout tensors: x [B, C, H, W] -> [B, out, H, W]."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  lin = lambda name, v: v @ sd[f'{name}.weight'].T + sd[f'{name}.bias']
  b, cin, h, w = x.shape
  p = patch
  weight = sd['x_embedder.proj.weight']  # [C, Cin, p, p]
  hidden = weight.shape[0]
  # Conv2d(kernel p, stride p) written out: out[b, o, i, j] = sum W[o, c, kh, kw] x[b, c, i*p+kh, j*p+kw]
  windows = x.reshape(b, cin, h // p, p, w // p, p)  # [B, Cin, i, kh, j, kw]
  conv = np.einsum('bcikjl,ockl->boij', windows, weight) + sd['x_embedder.proj.bias'][None, :, None, None]
  tokens = conv.reshape(b, hidden, -1).transpose(0, 2, 1) + sd['pos_embed'][0]  # timm: flatten(2).transpose(1, 2)
  c = lin('t_embedder.mlp.2', reference_dit.silu(lin('t_embedder.mlp.0', reference_dit.timestep_features(t))))
  c = c + sd['y_embedder.embedding_table.weight'][y]
  if 'sample_embedder.embedding_table.weight' in sd:
    c = c + sd['sample_embedder.embedding_table.weight'][sample_ids]
  depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
  d = hidden // num_heads
  for i in range(depth):
    mod = lin(f'blocks.{i}.adaLN_modulation.1', reference_dit.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = np.split(mod, 6, axis=1)
    x_mod = reference_dit.layer_norm(tokens) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    seq = x_mod.reshape(b // group_size, -1, hidden)  # "(b m) t d -> b (m t) d"
    n, length = seq.shape[:2]
    qkv = lin(f'blocks.{i}.attn.qkv', seq).reshape(n, length, 3, num_heads, d).transpose(2, 0, 3, 1, 4)
    attn = reference_dit.softmax(qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * d**-0.5) @ qkv[2]  # [n, H, T, D]
    attn = lin(f'blocks.{i}.attn.proj', attn.transpose(0, 2, 1, 3).reshape(n, length, hidden))
    tokens = tokens + gate_msa[:, None] * attn.reshape(b, -1, hidden)
    x_mod = reference_dit.layer_norm(tokens) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    mlp = lin(f'blocks.{i}.mlp.fc2', reference_dit.gelu_tanh(lin(f'blocks.{i}.mlp.fc1', x_mod)))
    tokens = tokens + gate_mlp[:, None] * mlp
  shift, scale = np.split(lin('final_layer.adaLN_modulation.1', reference_dit.silu(c)), 2, axis=1)
  out = lin('final_layer.linear', reference_dit.layer_norm(tokens) * (1 + scale[:, None]) + shift[:, None])
  g = h // p
  out_ch = out.shape[-1] // (p * p)
  out = out.reshape(b, g, g, p, p, out_ch)
  return np.einsum('nhwpqc->nchpwq', out).reshape(b, out_ch, h, w)


def inputs(batch=8, seed=2):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4, 8, 8))  # NCHW, as the official code
  t = rng.uniform(0, 1000, batch)
  y = rng.integers(0, 6, batch).astype(np.int32)
  ids = np.concatenate([rng.permutation(4) for _ in range(batch // 4)]).astype(np.int32)
  return x, t, y, ids


def save(sd, tmp_path, fmt, name='weights'):
  path = tmp_path / f'{name}.{fmt}'
  if fmt == 'safetensors':
    safetensors.numpy.save_file(sd, str(path))
  else:
    np.savez(path, **sd)
  return path


def convert_file(path, output, **kwargs):
  return convert.convert_checkpoint(path, output, 'DiT-S/2', input_size=8, num_classes=5,
                                    model_overrides=OVERRIDES, **kwargs)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize('fmt', ['safetensors', 'npz'])
def test_every_param_comes_from_the_file_with_the_right_layout(tmp_path, fmt):
  sd = official_state_dict()
  report = convert_file(save(sd, tmp_path, fmt), tmp_path / 'out')
  params = converted.load_converted_params(tmp_path / 'out')

  expected = convert.expected_param_shapes(tiny_model())
  got = {tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert got == expected
  assert report.mapped == len(expected) == len(sd) - 1  # all but pos_embed
  assert set(report.ignored) == {'pos_embed'} and not report.fresh
  # Transposes by hand: Linear [out, in] -> kernel [in, out]; conv [O, I, kh, kw] -> [kh, kw, I, O].
  qkv = np.asarray(params['blocks_1']['attn']['qkv']['kernel'])
  assert qkv.shape == (32, 96) and qkv[3, 70] == sd['blocks.1.attn.qkv.weight'][70, 3]
  fc1 = np.asarray(params['blocks_0']['mlp']['fc1']['kernel'])
  assert fc1[31, 100] == sd['blocks.0.mlp.fc1.weight'][100, 31]
  np.testing.assert_array_equal(params['t_embedder']['mlp_0']['kernel'], sd['t_embedder.mlp.0.weight'].T)
  conv = np.asarray(params['x_embedder']['proj']['kernel'])
  assert conv.shape == (2, 2, 4, 32) and conv[1, 0, 3, 17] == sd['x_embedder.proj.weight'][17, 3, 1, 0]
  np.testing.assert_array_equal(params['y_embedder']['embedding_table']['embedding'],
                                sd['y_embedder.embedding_table.weight'])
  np.testing.assert_array_equal(params['sample_embedder']['embedding_table']['embedding'],
                                sd['sample_embedder.embedding_table.weight'])
  np.testing.assert_array_equal(params['final_layer']['adaLN_modulation_1']['bias'],
                                sd['final_layer.adaLN_modulation.1.bias'])
  record = converted.read_conversion_record(tmp_path / 'out')
  assert record['architecture']['max_group_size'] == 4 and record['architecture']['learn_sigma']


def test_patch_conv_matches_a_direct_conv_of_the_oihw_weights():
  sd = official_state_dict()
  params, _ = convert.convert_state_dict(sd, tiny_model())
  x, *_ = inputs()
  ours = dit.PatchEmbed(32, 2).apply({'params': params['x_embedder']}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  w, bias = sd['x_embedder.proj.weight'], sd['x_embedder.proj.bias']
  direct = np.zeros((8, 4, 4, 32))  # [B, i, j, C]
  for i in range(4):
    for j in range(4):
      patch = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]  # [B, Cin, kh, kw]
      direct[:, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + bias
  np.testing.assert_allclose(np.asarray(ours), direct.reshape(8, 16, 32), rtol=1e-5, atol=1e-5)


def assert_matches(ours_nhwc, ref_nchw):
  ref = ref_nchw.transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(ours_nhwc), ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize('group_size', [1, 4])
def test_converted_model_equals_the_official_layout_forward(group_size):
  sd = official_state_dict(seed=1)
  model = tiny_model()
  params, _ = convert.convert_state_dict(sd, model)
  x, t, y, ids = inputs()
  apply = jax.jit(model.apply, static_argnames='group_size')
  ours = apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), jnp.asarray(t, jnp.float32),
               y, ids, group_size=group_size)
  assert_matches(ours, official_forward(sd, x, t, y, ids, patch=2, num_heads=4, group_size=group_size))
  # ... and the NumPy reference of our own layout agrees on the converted params.
  ref = reference_dit.dit_forward(jax.tree.map(np.asarray, params), x, t, y, ids, patch_size=2, num_heads=4,
                                  out_channels=8, group_size=group_size)
  assert_matches(ours, ref)


def test_repa_sit_layout_ignores_projectors_and_has_no_learned_sigma(tmp_path):
  sd = official_state_dict(learn_sigma=False, max_group_size=0, repa_projectors=True)
  report = convert_file(save(sd, tmp_path, 'safetensors'), tmp_path / 'out')
  assert report.architecture['learn_sigma'] is False and report.architecture['max_group_size'] == 0
  assert sorted(report.ignored) == sorted(['pos_embed'] + [k for k in sd if k.startswith('projectors.')])
  assert all('REPA' in why for k, why in report.ignored.items() if k.startswith('projectors.'))
  params = converted.load_converted_params(tmp_path / 'out')
  model = tiny_model(learn_sigma=False, max_group_size=0)
  x, t, y, _ = inputs()
  ours = jax.jit(model.apply)({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32),
                              jnp.asarray(t, jnp.float32), y)
  sd_plain = {k: v for k, v in sd.items() if not k.startswith('projectors.')}
  assert_matches(ours, official_forward(sd_plain, x, t, y, None, patch=2, num_heads=4))


def error_of(sd, model=None):
  with pytest.raises(weights_io.WeightsImportError) as info:
    convert.convert_state_dict(sd, model or tiny_model())
  return str(info.value)


def test_errors_name_missing_extra_and_misshaped_keys():
  sd = official_state_dict()
  del sd['blocks.1.mlp.fc2.bias']
  sd['blocks.2.attn.qkv.weight'] = np.zeros((96, 32), np.float32)  # a third block in a depth-2 model
  sd['decoder.head.weight'] = np.zeros((3,), np.float32)
  sd['blocks.0.attn.proj.weight'] = np.zeros((32, 16), np.float32)
  message = error_of(sd)
  assert 'blocks.1.mlp.fc2.bias: expected (32,)' in message
  assert 'blocks.2.attn.qkv.weight' in message and 'decoder.head.weight' in message
  assert 'blocks.0.attn.proj.weight: expected (32, 32), found (32, 16)' in message
  assert message.count('blocks.0.attn.proj.weight') == 1  # not also listed as missing


def test_errors_for_unsupported_layouts_and_a_wrong_pos_embed():
  sd = official_state_dict()
  sd['blocks.0.attn.q_norm.weight'] = np.ones((8,), np.float32)
  sd['pos_embed'] = sd['pos_embed'][:, ::-1].copy()
  message = error_of(sd)
  assert 'blocks.0.attn.q_norm.weight: qk-norm' in message
  assert 'pos_embed: differs' in message
  sd = official_state_dict(input_size=16)  # 64 tokens for an 8x8 model (and the same params otherwise)
  assert 'pos_embed: expected (1, 16, 32)' in error_of(sd)


def test_a_groupdiff_file_into_a_model_without_sample_embedding_is_an_error():
  message = error_of(official_state_dict(), tiny_model(max_group_size=0))
  assert 'sample_embedder.embedding_table.weight' in message and '--max_group_size' in message
  assert 'sample_embedder.embedding_table.weight: expected (2, 32), found (4, 32)' in error_of(
      official_state_dict(), tiny_model(max_group_size=2))


@pytest.mark.parametrize('fmt', ['safetensors', 'npz'])
def test_denoiser_prefix_and_model_or_ema_selection(tmp_path, fmt):
  raw, ema = official_state_dict(seed=3), official_state_dict(seed=4)
  flat = {f'model.denoiser.{k}': v for k, v in raw.items()}
  flat.update({f'model_ema.denoiser.{k}': v for k, v in ema.items()})
  path = save(flat, tmp_path, fmt)
  report = convert_file(path, tmp_path / 'ema')
  assert report.weights == 'model_ema'
  np.testing.assert_array_equal(converted.load_converted_params(tmp_path / 'ema')['blocks_0']['mlp']['fc2']['bias'],
                                ema['blocks.0.mlp.fc2.bias'])
  report = convert_file(path, tmp_path / 'raw', use_ema=False)
  assert report.weights == 'model'
  np.testing.assert_array_equal(converted.load_converted_params(tmp_path / 'raw')['blocks_0']['mlp']['fc2']['bias'],
                                raw['blocks.0.mlp.fc2.bias'])
  only_raw = save({f'model.{k}': v for k, v in raw.items()}, tmp_path, fmt, 'raw_only')
  with pytest.raises(weights_io.WeightsImportError, match='No EMA weights.*--nouse_ema'):
    convert_file(only_raw, tmp_path / 'x')
  with pytest.raises(FileExistsError):
    convert_file(path, tmp_path / 'ema')


def test_ddp_and_compile_prefixes_and_torch_checkpoint_containers():
  sd = official_state_dict()
  state, chosen = convert.select_weights({f'ema.module._orig_mod.{k}': v for k, v in sd.items()})
  assert chosen == 'ema' and set(state) == set(sd)
  flat, skipped = convert.flatten_checkpoint({'model': sd, 'model_ema': sd, 'optimizer': {'state': {}},
                                              'epoch': 3})
  assert sorted(skipped) == ['epoch', 'optimizer'] and len(flat) == 2 * len(sd)
  assert convert.flatten_checkpoint(sd) == (sd, [])


def test_from_pretrained_initialises_a_fresh_sample_embedding(tmp_path, caplog):
  sd = official_state_dict(max_group_size=0)  # a plain DiT/SiT state dict
  path = save(sd, tmp_path, 'safetensors')
  report = convert_file(path, tmp_path / 'a', max_group_size=4, seed=7)
  assert list(report.fresh) == ['sample_embedder/embedding_table/embedding']
  assert 'std=0.02' in report.fresh['sample_embedder/embedding_table/embedding']
  assert 'sample_embedder' in caplog.text and 'fresh' in caplog.text
  table = np.asarray(converted.load_converted_params(tmp_path / 'a')['sample_embedder']['embedding_table']['embedding'])
  assert table.shape == (4, 32) and 0.015 < table.std() < 0.025
  assert abs(table.mean()) < 0.01
  again, _ = convert.convert_state_dict(sd, tiny_model(), seed=7)
  other, _ = convert.convert_state_dict(sd, tiny_model(), seed=8)
  np.testing.assert_array_equal(again['sample_embedder']['embedding_table']['embedding'], table)
  assert np.abs(np.asarray(other['sample_embedder']['embedding_table']['embedding']) - table).max() > 0
  record = json.loads((tmp_path / 'a' / 'converted.json').read_text())
  assert record['fresh'] == report.fresh
  # Without --max_group_size the file decides: no sample embedding.
  assert convert_file(path, tmp_path / 'b').architecture['max_group_size'] == 0


def test_rename_table_covers_every_param_of_sit_xl2_both_ways():
  model = dit.DiT(**dit.parse_variant('SiT-XL/2'), max_group_size=4)
  expected = convert.expected_param_shapes(model)
  keys = {convert.official_key(path): path for path in expected}
  assert len(keys) == len(expected)
  for key, path in keys.items():
    assert convert.our_path(key)[0] == path
  assert keys['blocks.27.adaLN_modulation.1.weight'] == ('blocks_27', 'adaLN_modulation_1', 'kernel')


def test_pth_needs_torch_with_a_clear_message(tmp_path, monkeypatch):
  path = tmp_path / 'w.pth'
  path.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed
  with pytest.raises(ImportError, match='pip install torch.*safetensors'):
    convert.read_checkpoint(path)


def test_pth_groupdiff_checkpoint_with_torch(tmp_path):
  torch = pytest.importorskip('torch')
  raw, ema = official_state_dict(seed=3), official_state_dict(seed=4)
  checkpoint = {'model': {f'denoiser.{k}': torch.from_numpy(v) for k, v in raw.items()},
                'model_ema': {f'denoiser.{k}': torch.from_numpy(v).bfloat16() for k, v in ema.items()},
                'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 799, 'last_elapsed_time': 1.0}
  torch.save(checkpoint, tmp_path / 'gdiff.pth')
  report = convert_file(tmp_path / 'gdiff.pth', tmp_path / 'out')
  assert report.weights == 'model_ema' and 'optimizer' in report.skipped_entries
  bias = np.asarray(converted.load_converted_params(tmp_path / 'out')['blocks_0']['mlp']['fc2']['bias'])
  np.testing.assert_allclose(bias, ema['blocks.0.mlp.fc2.bias'], rtol=1e-2)


@pytest.mark.parametrize('name, final_outputs', [('eval_gdiff_dit_xl', 2 * 2 * 8), ('eval_gdiff_sit_xl', 2 * 2 * 4)])
def test_eval_configs_build_the_released_architectures(name, final_outputs):
  config = __import__(f'configs.{name}', fromlist=['get_config']).get_config()
  shapes = convert.expected_param_shapes(dit.model_from_config(config.model))
  assert shapes[('sample_embedder', 'embedding_table', 'embedding')] == (4, 1152)
  assert shapes[('final_layer', 'linear', 'kernel')] == (1152, final_outputs)
  assert ('blocks_27', 'attn', 'qkv', 'kernel') in shapes and ('blocks_28', 'attn', 'qkv', 'kernel') not in shapes


def test_bfloat16_safetensors_convert_with_the_rounded_pos_embed(tmp_path):
  sd = official_state_dict()
  path = save({k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}, tmp_path, 'safetensors')
  convert_file(path, tmp_path / 'out')
  kernel = np.asarray(converted.load_converted_params(tmp_path / 'out')['blocks_1']['mlp']['fc1']['kernel'])
  np.testing.assert_array_equal(kernel, sd['blocks.1.mlp.fc1.weight'].astype(ml_dtypes.bfloat16).astype(np.float32).T)


@pytest.mark.parametrize('content', [b'', b'\x00' * 64, b'PK\x03\x04 truncated zip'])
def test_broken_pth_is_not_reported_as_needing_pickle(tmp_path, content):
  pytest.importorskip('torch')
  path = tmp_path / 'broken.pth'
  path.write_bytes(content)
  with pytest.raises(weights_io.WeightsImportError, match='truncated or not a PyTorch checkpoint') as info:
    convert.read_checkpoint(path)
  assert 'allow_pickle' not in str(info.value)


def test_pth_with_argparse_namespace_loads_without_pickle(tmp_path):
  torch = pytest.importorskip('torch')
  import argparse  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'official.pth'
  torch.save({'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(model='DiT-XL/2')}, path)
  flat, _ = convert.read_checkpoint(path)
  np.testing.assert_array_equal(flat['model.w'], np.ones(2, np.float32))
