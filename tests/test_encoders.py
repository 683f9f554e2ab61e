"""DINOv2 / CLIP image towers: weights in the HuggingFace layout, parity with a NumPy reference, preprocessing.

The reference forward below is written from the HuggingFace modules
(Dinov2Model, CLIPVisionModelWithProjection) on the PyTorch-layout state
dict, in NCHW, without the converter's rename tables: it checks the tables
and the Flax modules independently. The second, independent reference is
transformers 4.57.6's Flax models (the last release that has them; the
`test` extra), given the same state dict through transformers' own
PyTorch-to-Flax conversion; skipped where transformers is not installed.
"""

import dataclasses
import functools
import types

import jax
import numpy as np
import pytest

from groupdiff_jax import weights_io
from groupdiff_jax.encoders import clip, dinov2, vit

D, DEPTH, HEADS, MLP, PATCH = 32, 2, 4, 64, 14


def hf_state(kind, grid, rng):
  """A random state dict with the HuggingFace keys and PyTorch shapes."""
  s = {}
  w = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
  norm = lambda name: s.update({f'{name}.weight': 1 + w(D), f'{name}.bias': w(D)})
  lin = lambda name, i, o, bias=True: s.update({f'{name}.weight': w(o, i), **({f'{name}.bias': w(o)} if bias else {})})
  if kind == 'dinov2':
    s['embeddings.cls_token'] = w(1, 1, D)
    s['embeddings.mask_token'] = w(1, D)
    s['embeddings.position_embeddings'] = w(1, 1 + grid * grid, D)
    s['embeddings.patch_embeddings.projection.weight'] = w(D, 3, PATCH, PATCH)
    s['embeddings.patch_embeddings.projection.bias'] = w(D)
    for i in range(DEPTH):
      p = f'encoder.layer.{i}.'
      norm(p + 'norm1'), norm(p + 'norm2')
      for n in ('query', 'key', 'value'):
        lin(p + f'attention.attention.{n}', D, D)
      lin(p + 'attention.output.dense', D, D)
      s[p + 'layer_scale1.lambda1'], s[p + 'layer_scale2.lambda1'] = w(D), w(D)
      lin(p + 'mlp.fc1', D, MLP), lin(p + 'mlp.fc2', MLP, D)
    norm('layernorm')
  else:
    v = 'vision_model.'
    s[v + 'embeddings.class_embedding'] = w(D)
    s[v + 'embeddings.patch_embedding.weight'] = w(D, 3, PATCH, PATCH)
    s[v + 'embeddings.position_embedding.weight'] = w(1 + grid * grid, D)
    s[v + 'embeddings.position_ids'] = np.arange(1 + grid * grid)[None]
    norm(v + 'pre_layrnorm')
    for i in range(DEPTH):
      p = f'{v}encoder.layers.{i}.'
      norm(p + 'layer_norm1'), norm(p + 'layer_norm2')
      for n in ('q', 'k', 'v', 'out'):
        lin(p + f'self_attn.{n}_proj', D, D)
      lin(p + 'mlp.fc1', D, MLP), lin(p + 'mlp.fc2', MLP, D)
    norm(v + 'post_layernorm')
    lin('visual_projection', D, 16, bias=False)
    s['text_model.embeddings.token_embedding.weight'] = w(10, D)  # the text tower is skipped
    s['text_projection.weight'], s['logit_scale'] = w(16, D), np.array(2.6, np.float32)
  return s


def torch_bicubic(grid, size):
  """F.interpolate(bicubic, align_corners=False) of [C, h, w], one output pixel at a time."""
  def cubic(x, a=-0.75):
    x = abs(x)
    return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0
  c, h, w = grid.shape
  out = np.zeros((c, size, size))
  for i in range(size):
    for j in range(size):
      y, x = (i + 0.5) * h / size - 0.5, (j + 0.5) * w / size - 0.5
      for dy in range(-1, 3):
        for dx in range(-1, 3):
          yy, xx = int(np.floor(y)) + dy, int(np.floor(x)) + dx
          weight = cubic(y - yy) * cubic(x - xx)
          out[:, i, j] += weight * grid[:, min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)]
  return out


def reference(kind, s, pixels):
  """NumPy forward of the HuggingFace module on NCHW pixels [B, 3, S, S]."""
  def ln(x, name, eps):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * s[f'{name}.weight'] + s[f'{name}.bias']
  lin = lambda x, name: x @ s[f'{name}.weight'].T + s.get(f'{name}.bias', 0)
  b, _, side, _ = pixels.shape
  g = side // PATCH
  patches = pixels.reshape(b, 3, g, PATCH, g, PATCH).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
  if kind == 'dinov2':
    pre, eps, act = '', 1e-6, lambda x: 0.5 * x * (1 + np.vectorize(__import__('math').erf)(x / np.sqrt(2)))
    x = patches @ s['embeddings.patch_embeddings.projection.weight'].reshape(D, -1).T
    x = x + s['embeddings.patch_embeddings.projection.bias']
    x = np.concatenate([np.repeat(s['embeddings.cls_token'], b, 0), x], 1)
    pos = s['embeddings.position_embeddings']
    old = int(np.sqrt(pos.shape[1] - 1))
    grid = torch_bicubic(pos[0, 1:].reshape(old, old, D).transpose(2, 0, 1), g).transpose(1, 2, 0).reshape(1, -1, D)
    x = x + np.concatenate([pos[:, :1], grid], 1)
    names = dict(layer='encoder.layer.{}.', n1='norm1', n2='norm2', q='attention.attention.query',
                 k='attention.attention.key', v='attention.attention.value', o='attention.output.dense')
  else:
    pre, eps, act = 'vision_model.', 1e-5, lambda x: x / (1 + np.exp(-1.702 * x))
    x = patches @ s[pre + 'embeddings.patch_embedding.weight'].reshape(D, -1).T
    x = np.concatenate([np.broadcast_to(s[pre + 'embeddings.class_embedding'], (b, 1, D)), x], 1)
    x = ln(x + s[pre + 'embeddings.position_embedding.weight'], pre + 'pre_layrnorm', eps)
    names = dict(layer=pre + 'encoder.layers.{}.', n1='layer_norm1', n2='layer_norm2', q='self_attn.q_proj',
                 k='self_attn.k_proj', v='self_attn.v_proj', o='self_attn.out_proj')
  for i in range(DEPTH):
    p = names['layer'].format(i)
    h = ln(x, p + names['n1'], eps)
    heads = lambda t: t.reshape(b, -1, HEADS, D // HEADS).transpose(0, 2, 1, 3)
    q, k, v = (heads(lin(h, p + names[n])) for n in 'qkv')
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // HEADS)
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    h = lin((a @ v).transpose(0, 2, 1, 3).reshape(b, -1, D), p + names['o'])
    x = x + (h * s[p + 'layer_scale1.lambda1'] if kind == 'dinov2' else h)
    h = lin(act(lin(ln(x, p + names['n2'], eps), p + 'mlp.fc1')), p + 'mlp.fc2')
    x = x + (h * s[p + 'layer_scale2.lambda1'] if kind == 'dinov2' else h)
  if kind == 'dinov2':
    return ln(x, 'layernorm', eps)[:, 0]  # pooler_output
  return lin(ln(x[:, 0], pre + 'post_layernorm', eps), 'visual_projection')  # image_embeds


TINY = dict(hidden_size=D, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, image_size=2 * PATCH)


@pytest.mark.parametrize('kind,base,checkpoint_grid', [('dinov2', dinov2.DINOV2_L14, 3), ('clip', clip.CLIP_L14, 2)])
def test_tower_in_the_published_layout_equals_the_reference(kind, base, checkpoint_grid):
  config = dataclasses.replace(base, projection_dim=16 if base.projection_dim else 0, **TINY)
  rng = np.random.default_rng(0)
  state = hf_state(kind, checkpoint_grid, rng)
  module = dinov2 if kind == 'dinov2' else clip
  params = module.convert(state, config)
  pixels = rng.standard_normal((2, 2 * PATCH, 2 * PATCH, 3)).astype(np.float32)
  got = jax.jit(vit.ViT(config).apply)({'params': params}, pixels)
  want = reference(kind, state, pixels.transpose(0, 3, 1, 2).astype(np.float64))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def hf_flax_params(model, state, input_shape):
  """transformers' own conversion of a PyTorch-layout state dict to `model`'s params (shapes by eval_shape)."""
  from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
  shapes = jax.eval_shape(functools.partial(model.init_weights, input_shape=input_shape), jax.random.PRNGKey(0))
  return convert_pytorch_state_dict_to_flax(dict(state), types.SimpleNamespace(
      params=shapes, base_model_prefix=model.base_model_prefix))


@pytest.mark.parametrize('kind', ['dinov2', 'clip'])
def test_tower_equals_transformers_flax_model(kind):
  """Ours == transformers' FlaxDinov2Model pooler_output / FlaxCLIPModel.get_image_features (image_embeds).

  The checkpoint's position grid is the image's: transformers' Flax DINOv2
  resizes positions with jax.image bicubic (a = -0.5, +0.1 offset), not
  PyTorch's, and its Flax CLIP cannot resize; the resize is checked against
  PyTorch's bicubic in the NumPy reference test above.
  """
  transformers = pytest.importorskip('transformers')
  side, grid = 2 * PATCH, 2
  rng = np.random.default_rng(1)
  state = hf_state(kind, grid, rng)
  pixels = rng.standard_normal((2, side, side, 3)).astype(np.float32)
  if kind == 'dinov2':
    hf_config = transformers.Dinov2Config(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                          mlp_ratio=MLP // D, patch_size=PATCH, image_size=side)
    model = transformers.FlaxDinov2Model(hf_config, _do_init=False)
    hf_params = hf_flax_params(model, state, (1, side, side, 3))
    forward = lambda p, x: model(x, params=p).pooler_output
    config = dataclasses.replace(dinov2.DINOV2_L14, **TINY)
    params = dinov2.convert(state, config)
  else:
    tower = dict(hidden_size=D, num_attention_heads=HEADS, intermediate_size=MLP)
    hf_config = transformers.CLIPConfig(
        text_config=dict(tower, num_hidden_layers=1, vocab_size=10, max_position_embeddings=8),
        vision_config=dict(tower, num_hidden_layers=DEPTH, patch_size=PATCH, image_size=side), projection_dim=16)
    model = transformers.FlaxCLIPModel(hf_config, _do_init=False)
    hf_params = hf_flax_params(model, state, ((1, 1), (1, side, side, 3)))
    forward = lambda p, x: model.get_image_features(x, params=p)  # image_embeds; the text tower is not run
    config = dataclasses.replace(clip.CLIP_L14, projection_dim=16, **TINY)
    params = clip.convert(state, config)
  want = jax.jit(forward)(hf_params, pixels.transpose(0, 3, 1, 2))  # transformers takes NCHW
  got = jax.jit(vit.ViT(config).apply)({'params': params}, pixels)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_converter_names_unknown_missing_and_misshapen_keys():
  config = dataclasses.replace(dinov2.DINOV2_L14, **TINY)
  state = hf_state('dinov2', 2, np.random.default_rng(0))
  state['encoder.layer.0.extra.weight'] = np.zeros(3)
  state['encoder.layer.1.mlp.fc1.weight'] = np.zeros((5, D), np.float32)
  del state['layernorm.bias']
  with pytest.raises(weights_io.WeightsImportError) as error:
    dinov2.convert(state, config)
  text = str(error.value)
  assert 'encoder.layer.0.extra.weight' in text and 'encoder.layer.1.mlp.fc1.weight' in text and 'norm/bias' in text


def test_position_grid_resize_matches_pytorch_bicubic():
  grid = np.random.default_rng(0).standard_normal((5, 5, 3))
  np.testing.assert_allclose(vit.resize_bicubic_torch(grid, 3), torch_bicubic(grid.transpose(2, 0, 1), 3).transpose(1, 2, 0),
                             atol=1e-5)
  np.testing.assert_allclose(vit.resize_bicubic_torch(grid, 5), grid, atol=1e-6)


def test_preprocessing_of_the_adm_crop():
  crops = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), np.uint8)
  x = dinov2.preprocess(crops)
  assert x.shape == (2, 224, 224, 3)
  np.testing.assert_allclose(x[0, 0, 0], (crops[0, 16, 16] / 255 - dinov2.MEAN) / dinov2.STD, rtol=1e-5)
  y = clip.preprocess(crops)
  assert y.shape == (2, 224, 224, 3) and abs(y.mean()) < 0.5


def test_embedding_job_resumes_and_writes_unit_rows(tmp_path):
  import tensorflow_datasets as tfds
  from groupdiff_jax.data import embeddings_job, latent_store
  config = dataclasses.replace(dinov2.DINOV2_L14, **dict(TINY, image_size=224))
  params = dinov2.convert(hf_state('dinov2', 3, np.random.default_rng(0)), config)
  opts = dict(config=config, batch_size=4, shard_size=4)
  with tfds.testing.mock_data(num_examples=10):
    assert embeddings_job.run(str(tmp_path / 'a'), 'dinov2_l14', params, max_shards=2, **opts) is None
    embeddings_job.run(str(tmp_path / 'a'), 'dinov2_l14', params, **opts)
    embeddings_job.run(str(tmp_path / 'b'), 'dinov2_l14', params, **opts)
  a, b = np.load(tmp_path / 'a' / 'embeddings.npy'), np.load(tmp_path / 'b' / 'embeddings.npy')
  assert a.shape == (10, D) and a.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
  np.testing.assert_array_equal(a, b)
  assert latent_store.read_meta(str(tmp_path / 'a'))['encoder'] == 'dinov2_l14'
