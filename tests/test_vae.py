"""SD-VAE: weight import from the diffusers layout, parity with a NumPy reference, shapes and latent scale.

The state dicts here are built from the architecture description (diffusers
`Encoder` / `Decoder` / `UNetMidBlock2D` / `ResnetBlock2D`), not from the
converter's rename table, and the NumPy forward is written in NCHW on the
PyTorch-layout weights, so both check the converter and the modules
independently.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from groupdiff_jax import weights_io
from groupdiff_jax.encoders import vae as vae_lib
from groupdiff_jax.encoders import vae_weights

# Two blocks: a downsample, an upsample, channel changes (conv_shortcut) both ways; latents are images / 2.
TINY = vae_lib.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
IMAGE_SIDE, LATENT_SIDE = 16, 8
NEW_ATTENTION = ('to_q', 'to_k', 'to_v', 'to_out.0')
OLD_ATTENTION = ('query', 'key', 'value', 'proj_attn')


# ---------------------------------------------------------------- diffusers layout, from the architecture


def diffusers_shapes(cfg, attention_names=NEW_ATTENTION, attention_4d=False):
  """{key: PyTorch shape} of a diffusers AutoencoderKL state dict, walked like diffusers builds the modules."""
  shapes = {}

  def conv(name, cin, cout, k):
    shapes[f'{name}.weight'] = (cout, cin, k, k)
    shapes[f'{name}.bias'] = (cout,)

  def norm(name, c):
    shapes[f'{name}.weight'] = (c,)
    shapes[f'{name}.bias'] = (c,)

  def resnet(name, cin, cout):
    norm(f'{name}.norm1', cin)
    conv(f'{name}.conv1', cin, cout, 3)
    norm(f'{name}.norm2', cout)
    conv(f'{name}.conv2', cout, cout, 3)
    if cin != cout:
      conv(f'{name}.conv_shortcut', cin, cout, 1)

  def mid_block(name, c):
    resnet(f'{name}.resnets.0', c, c)
    norm(f'{name}.attentions.0.group_norm', c)
    for proj in attention_names:
      shapes[f'{name}.attentions.0.{proj}.weight'] = (c, c, 1, 1) if attention_4d else (c, c)
      shapes[f'{name}.attentions.0.{proj}.bias'] = (c,)
    resnet(f'{name}.resnets.1', c, c)

  ch, lat, n = cfg.block_out_channels, cfg.latent_channels, len(cfg.block_out_channels)
  conv('encoder.conv_in', cfg.in_channels, ch[0], 3)
  for i in range(n):
    cin = ch[max(i - 1, 0)]
    for j in range(cfg.layers_per_block):
      resnet(f'encoder.down_blocks.{i}.resnets.{j}', cin if j == 0 else ch[i], ch[i])
    if i < n - 1:
      conv(f'encoder.down_blocks.{i}.downsamplers.0.conv', ch[i], ch[i], 3)
  mid_block('encoder.mid_block', ch[-1])
  norm('encoder.conv_norm_out', ch[-1])
  conv('encoder.conv_out', ch[-1], 2 * lat, 3)
  conv('quant_conv', 2 * lat, 2 * lat, 1)
  conv('post_quant_conv', lat, lat, 1)
  conv('decoder.conv_in', lat, ch[-1], 3)
  mid_block('decoder.mid_block', ch[-1])
  rev = ch[::-1]
  for i in range(n):
    cin = rev[max(i - 1, 0)]
    for j in range(cfg.layers_per_block + 1):
      resnet(f'decoder.up_blocks.{i}.resnets.{j}', cin if j == 0 else rev[i], rev[i])
    if i < n - 1:
      conv(f'decoder.up_blocks.{i}.upsamplers.0.conv', rev[i], rev[i], 3)
  norm('decoder.conv_norm_out', ch[0])
  conv('decoder.conv_out', ch[0], cfg.out_channels, 3)
  return shapes


def random_state_dict(cfg, seed=0, dtype=np.float32, **layout):
  """Random weights in the diffusers layout; weights ~ N(0, 1/fan_in), norm scales ~ 1, all values distinct."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in diffusers_shapes(cfg, **layout).items():
    if len(shape) == 1:
      base = 1.0 if key.endswith('weight') and 'norm' in key else 0.0
      value = base + 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    state[key] = value.astype(dtype)
  return state


def flat_params(params):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(k.key for k in path): np.asarray(leaf) for path, leaf in leaves}


@pytest.fixture(scope='module')
def state():
  return random_state_dict(TINY, seed=0)


@pytest.fixture(scope='module')
def params(state):
  return vae_weights.load_vae_params(state, TINY)


# ---------------------------------------------------------------- (a) import


def test_sd_vae_layout_matches_published_checkpoint_size():
  """The SD config: 248 tensors, 83,653,863 weights (the size diffusers reports for SD-VAE), same keys both ways."""
  expected = vae_weights.expected_param_shapes(vae_lib.SD_VAE_CONFIG)
  shapes = diffusers_shapes(vae_lib.SD_VAE_CONFIG)
  assert len(expected) == len(shapes) == 248
  assert sum(np.prod(s) for s in expected.values()) == sum(np.prod(s) for s in shapes.values()) == 83_653_863
  assert 'encoder.mid_block.attentions.0.to_q.weight' in shapes
  assert 'encoder.down_blocks.0.resnets.0.norm1.weight' in shapes


def test_round_trip_through_safetensors_sets_every_param(tmp_path, state):
  path = tmp_path / vae_weights.WEIGHTS_FILENAME
  safetensors.numpy.save_file(state, str(path))
  flat = flat_params(vae_weights.load_vae_params(path, TINY))
  assert len(flat) == len(state)
  # Every param is a (transposed) file tensor and every file tensor is used once: sorted values are a fingerprint.
  fingerprints = {np.sort(v, axis=None).tobytes(): k for k, v in state.items()}
  used = [fingerprints.get(np.sort(v, axis=None).tobytes()) for v in flat.values()]
  assert None not in used and len(set(used)) == len(state)
  # A few by hand.
  w = state['encoder.conv_in.weight']  # [O, I, kh, kw]
  np.testing.assert_array_equal(flat[('encoder', 'conv_in', 'kernel')][2, 0, 1, 5], w[5, 1, 2, 0])
  w = state['encoder.mid_block.attentions.0.to_q.weight']  # [out, in]
  np.testing.assert_array_equal(flat[('encoder', 'mid_block', 'attentions_0', 'to_q', 'kernel')], w.T)
  np.testing.assert_array_equal(flat[('decoder', 'mid_block', 'attentions_0', 'to_out_0', 'bias')],
                                state['decoder.mid_block.attentions.0.to_out.0.bias'])
  np.testing.assert_array_equal(flat[('decoder', 'up_blocks_1', 'resnets_0', 'norm1', 'scale')],
                                state['decoder.up_blocks.1.resnets.0.norm1.weight'])
  w = state['decoder.up_blocks.0.upsamplers.0.conv.weight']
  np.testing.assert_array_equal(flat[('decoder', 'up_blocks_0', 'upsamplers_0', 'conv', 'kernel')],
                                w.transpose(2, 3, 1, 0))
  # A directory holding the file works too.
  assert len(flat_params(vae_weights.load_vae_params(tmp_path, TINY))) == len(state)


@pytest.mark.parametrize('names,four_d', [(OLD_ATTENTION, False), (NEW_ATTENTION, True), (OLD_ATTENTION, True)])
def test_attention_spellings_and_1x1_conv_layout(params, names, four_d):
  state = random_state_dict(TINY, seed=0, attention_names=names, attention_4d=four_d)
  flat, reference = flat_params(vae_weights.load_vae_params(state, TINY)), flat_params(params)
  assert flat.keys() == reference.keys()
  for key in flat:
    np.testing.assert_array_equal(flat[key], reference[key])


@pytest.mark.parametrize('dtype', [np.float16, ml_dtypes.bfloat16])
def test_half_precision_files(tmp_path, dtype):
  state = random_state_dict(TINY, seed=1, dtype=dtype)
  path = tmp_path / 'vae.safetensors'
  safetensors.numpy.save_file(state, str(path))
  flat = flat_params(vae_weights.load_vae_params(path, TINY))
  kernel = flat[('encoder', 'down_blocks_1', 'resnets_0', 'conv_shortcut', 'kernel')]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
      kernel, state['encoder.down_blocks.1.resnets.0.conv_shortcut.weight'].astype(np.float32).transpose(2, 3, 1, 0))


def test_missing_key_is_named(state):
  broken = dict(state)
  del broken['decoder.up_blocks.1.resnets.1.conv2.bias']
  message = r'missing keys \(1\):\n  decoder\.up_blocks\.1\.resnets\.1\.conv2\.bias'
  with pytest.raises(weights_io.WeightsImportError, match=message):
    vae_weights.load_vae_params(broken, TINY)


def test_extra_key_is_named(state):
  broken = dict(state, **{'encoder.mid_block.attentions.0.rel_pos.weight': np.zeros(3, np.float32)})
  message = r'unknown keys \(1\):\n  encoder\.mid_block\.attentions\.0\.rel_pos\.weight'
  with pytest.raises(weights_io.WeightsImportError, match=message):
    vae_weights.load_vae_params(broken, TINY)
  # A key that is valid for a bigger model (a third block) is unknown here too.
  broken = dict(state, **{'encoder.down_blocks.2.resnets.0.norm1.weight': np.zeros(16, np.float32)})
  with pytest.raises(weights_io.WeightsImportError, match=r'encoder\.down_blocks\.2\.resnets\.0\.norm1\.weight'):
    vae_weights.load_vae_params(broken, TINY)


def test_wrong_shape_is_named_with_both_shapes(state):
  broken = dict(state, **{'encoder.down_blocks.0.downsamplers.0.conv.weight': np.zeros((8, 8, 4, 4), np.float32)})
  with pytest.raises(weights_io.WeightsImportError) as info:
    vae_weights.load_vae_params(broken, TINY)
  message = str(info.value)
  assert 'encoder.down_blocks.0.downsamplers.0.conv.weight: expected (8, 8, 3, 3), found (8, 8, 4, 4)' in message
  assert 'missing' not in message


def test_both_attention_spellings_at_once_is_an_error(state):
  prefix = 'encoder.mid_block.attentions.0'
  broken = dict(state, **{f'{prefix}.query.weight': state[f'{prefix}.to_q.weight']})
  message = r'query\.weight .*both map to encoder/mid_block/attentions_0/to_q/kernel'
  with pytest.raises(weights_io.WeightsImportError, match=message):
    vae_weights.load_vae_params(broken, TINY)


def test_missing_file_says_where_to_get_it(tmp_path):
  path = tmp_path / 'nowhere' / 'vae.safetensors'
  with pytest.raises(FileNotFoundError) as info:
    vae_weights.load_vae_params(path)
  message = str(info.value)
  assert str(path) in message
  assert 'stabilityai/sd-vae-ft-ema' in message and 'stabilityai/sd-vae-ft-mse' in message
  assert 'diffusion_pytorch_model.safetensors' in message


# ---------------------------------------------------------------- (b) NumPy reference, NCHW, float64


def np_conv(x, w, b, stride=1, pad=(1, 1, 1, 1)):
  """x [B, Ci, H, W], w [Co, Ci, kh, kw]; pad (left, right, top, bottom) as torch.nn.functional.pad."""
  left, right, top, bottom = pad
  x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
  kh, kw = w.shape[2:]
  ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out += np.einsum('bchw,oc->bohw', patch, w[:, :, i, j])
  return out + b[None, :, None, None]


def np_group_norm(x, w, b, groups, eps=1e-6):
  bsz, c, h, wd = x.shape
  g = x.reshape(bsz, groups, c // groups, h, wd)
  g = (g - g.mean(axis=(2, 3, 4), keepdims=True)) / np.sqrt(g.var(axis=(2, 3, 4), keepdims=True) + eps)
  return g.reshape(x.shape) * w[None, :, None, None] + b[None, :, None, None]


def np_silu(x):
  return x / (1 + np.exp(-x))


class NumpyVAE:
  """The diffusers forward, written from the architecture on a PyTorch-layout state dict."""

  def __init__(self, state, cfg):
    self.s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    self.cfg = cfg

  def conv(self, name, x, **kw):
    return np_conv(x, self.s[f'{name}.weight'], self.s[f'{name}.bias'], **kw)

  def norm(self, name, x):
    return np_group_norm(x, self.s[f'{name}.weight'], self.s[f'{name}.bias'], self.cfg.norm_num_groups)

  def resnet(self, name, x):
    h = self.conv(f'{name}.conv1', np_silu(self.norm(f'{name}.norm1', x)))
    h = self.conv(f'{name}.conv2', np_silu(self.norm(f'{name}.norm2', h)))
    if f'{name}.conv_shortcut.weight' in self.s:
      x = self.conv(f'{name}.conv_shortcut', x, pad=(0, 0, 0, 0))
    return x + h

  def downsample(self, name, x):
    return self.conv(f'{name}.conv', x, stride=2, pad=(0, 1, 0, 1))

  def upsample(self, name, x):
    return self.conv(f'{name}.conv', x.repeat(2, axis=2).repeat(2, axis=3))

  def attention(self, name, x):
    bsz, c, h, w = x.shape
    t = self.norm(f'{name}.group_norm', x).reshape(bsz, c, h * w).transpose(0, 2, 1)  # [B, T, C]
    lin = lambda p, v: v @ self.s[f'{name}.{p}.weight'].T + self.s[f'{name}.{p}.bias']
    q, k, v = lin('to_q', t), lin('to_k', t), lin('to_v', t)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(c)
    a = np.exp(scores - scores.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out = lin('to_out.0', a @ v).transpose(0, 2, 1).reshape(x.shape)
    return x + out

  def mid(self, name, x):
    x = self.resnet(f'{name}.resnets.0', x)
    x = self.attention(f'{name}.attentions.0', x)
    return self.resnet(f'{name}.resnets.1', x)

  def encode(self, images):
    cfg, n = self.cfg, len(self.cfg.block_out_channels)
    x = self.conv('encoder.conv_in', images)
    for i in range(n):
      for j in range(cfg.layers_per_block):
        x = self.resnet(f'encoder.down_blocks.{i}.resnets.{j}', x)
      if i < n - 1:
        x = self.downsample(f'encoder.down_blocks.{i}.downsamplers.0', x)
    x = self.mid('encoder.mid_block', x)
    x = self.conv('encoder.conv_out', np_silu(self.norm('encoder.conv_norm_out', x)))
    moments = self.conv('quant_conv', x, pad=(0, 0, 0, 0))
    mean, logvar = np.split(moments, 2, axis=1)
    return mean, np.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    cfg, n = self.cfg, len(self.cfg.block_out_channels)
    x = self.conv('decoder.conv_in', self.conv('post_quant_conv', z, pad=(0, 0, 0, 0)))
    x = self.mid('decoder.mid_block', x)
    for i in range(n):
      for j in range(cfg.layers_per_block + 1):
        x = self.resnet(f'decoder.up_blocks.{i}.resnets.{j}', x)
      if i < n - 1:
        x = self.upsample(f'decoder.up_blocks.{i}.upsamplers.0', x)
    return self.conv('decoder.conv_out', np_silu(self.norm('decoder.conv_norm_out', x)))


def nchw(x):
  return np.asarray(x, np.float64).transpose(0, 3, 1, 2)


def nhwc(x):
  return jnp.asarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))


def random_input(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape)  # NCHW


@pytest.mark.parametrize('block', ['resnet_shortcut', 'resnet', 'downsample', 'upsample', 'attention'])
def test_blocks_match_numpy_reference(state, params, block):
  ref = NumpyVAE(state, TINY)
  kw = dict(num_groups=TINY.norm_num_groups, eps=TINY.norm_eps)
  # block: (diffusers module, our params path, module, NCHW input, reference)
  name, path, module, x, expected = {
      'resnet_shortcut': ('decoder.up_blocks.1.resnets.0', ('decoder', 'up_blocks_1', 'resnets_0'),
                          vae_lib.ResnetBlock(8, **kw), random_input((2, 16, 6, 6), 1), ref.resnet),
      'resnet': ('decoder.mid_block.resnets.1', ('decoder', 'mid_block', 'resnets_1'),
                 vae_lib.ResnetBlock(16, **kw), random_input((2, 16, 4, 4), 2), ref.resnet),
      'downsample': ('encoder.down_blocks.0.downsamplers.0', ('encoder', 'down_blocks_0', 'downsamplers_0'),
                     vae_lib.Downsample(8), random_input((2, 8, 8, 8), 3), ref.downsample),
      'upsample': ('decoder.up_blocks.0.upsamplers.0', ('decoder', 'up_blocks_0', 'upsamplers_0'),
                   vae_lib.Upsample(16), random_input((2, 16, 4, 4), 4), ref.upsample),
      'attention': ('encoder.mid_block.attentions.0', ('encoder', 'mid_block', 'attentions_0'),
                    vae_lib.AttentionBlock(**kw), 3 * random_input((2, 16, 4, 5), 5), ref.attention),
  }[block]
  sub = params
  for part in path:
    sub = sub[part]
  out = jax.jit(module.apply)({'params': sub}, nhwc(x))
  want = expected(name, x)
  assert out.shape == nhwc(want).shape
  np.testing.assert_allclose(nchw(out), want, rtol=1e-5, atol=1e-5)


def test_tiny_vae_and_scaled_helpers_match_numpy_reference(state, params):
  """Full encode / decode through the helpers: latents = 0.18215 * posterior, images = clip(decode(latents / 0.18215))."""
  vae = vae_lib.AutoencoderKL(TINY)
  ref = NumpyVAE(state, TINY)
  assert TINY.scaling_factor == vae_lib.SD_VAE_CONFIG.scaling_factor == 0.18215
  images = np.tanh(random_input((2, 3, IMAGE_SIDE, IMAGE_SIDE), 6))  # NCHW
  latents = 2.0 * random_input((2, 4, LATENT_SIDE, LATENT_SIDE), 7)
  rng = jax.random.key(1)
  encode = jax.jit(vae_lib.latents_from_images, static_argnums=0)
  decode = jax.jit(vae_lib.images_from_latents, static_argnums=0)
  from_mean, from_sample = encode(vae, params, nhwc(images)), encode(vae, params, nhwc(images), rng)
  decoded = decode(vae, params, nhwc(latents))
  assert from_mean.shape == from_sample.shape == (2, LATENT_SIDE, LATENT_SIDE, 4)
  assert decoded.shape == (2, IMAGE_SIDE, IMAGE_SIDE, 3)

  want_mean, want_logvar = ref.encode(images)
  eps = nchw(jax.random.normal(rng, from_mean.shape))  # the noise sample_posterior draws
  np.testing.assert_allclose(nchw(from_mean), 0.18215 * want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(nchw(from_sample), 0.18215 * (want_mean + np.exp(0.5 * want_logvar) * eps),
                             rtol=1e-4, atol=1e-5)
  want_images = ref.decode(latents / 0.18215)
  assert np.abs(want_images).max() > 1.0  # the clip is exercised
  np.testing.assert_allclose(nchw(decoded), np.clip(want_images, -1.0, 1.0), rtol=1e-4, atol=1e-4)


def test_sample_posterior():
  mean = jnp.arange(8.0).reshape(1, 2, 2, 2)
  logvar = jnp.linspace(-2.0, 1.0, 8).reshape(1, 2, 2, 2)
  rng = jax.random.key(0)
  sample = vae_lib.AutoencoderKL.sample_posterior(rng, mean, logvar)
  np.testing.assert_allclose(sample, mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape), rtol=1e-6)


# ---------------------------------------------------------------- (c) shapes and the latent scale


def test_sd_vae_shapes_256_to_32():
  vae = vae_lib.AutoencoderKL(vae_lib.SD_VAE_CONFIG)
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(vae.init, jax.random.key(0), images)
  mean, logvar = jax.eval_shape(lambda v, x: vae.apply(v, x, method=vae_lib.AutoencoderKL.encode), variables, images)
  assert mean.shape == logvar.shape == (2, 32, 32, 4)
  decoded = jax.eval_shape(lambda v, z: vae.apply(v, z, method=vae_lib.AutoencoderKL.decode), variables, mean)
  assert decoded.shape == (2, 256, 256, 3) and decoded.dtype == jnp.float32


def test_bfloat16_compute_keeps_norms_and_outputs_in_float32(params):
  images = jax.ShapeDtypeStruct((2, IMAGE_SIDE, IMAGE_SIDE, 3), jnp.float32)
  vae16 = vae_lib.AutoencoderKL(TINY, dtype=jnp.bfloat16)
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and type(context.module) in (nn.GroupNorm, nn.Conv, nn.Dense):
      seen.setdefault(type(context.module).__name__, set()).add((args[0].dtype, out.dtype))
    return out

  with nn.intercept_methods(record):
    out, mean, logvar = jax.eval_shape(lambda x: vae16.apply({'params': params}, x), images)
  assert out.dtype == mean.dtype == logvar.dtype == jnp.float32
  assert seen['GroupNorm'] == {(np.dtype('float32'), np.dtype('float32'))}
  assert {out for _, out in seen['Conv'] | seen['Dense']} == {np.dtype(jnp.bfloat16)}
  # Numerics: the mid block (resnets, attention) in bf16 stays close to float32.
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 16))
  mid = params['encoder']['mid_block']
  kw = dict(num_groups=TINY.norm_num_groups, eps=TINY.norm_eps)
  out32 = jax.jit(vae_lib.MidBlock(**kw).apply)({'params': mid}, x)
  out16 = jax.jit(vae_lib.MidBlock(dtype=jnp.bfloat16, **kw).apply)({'params': mid}, x)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.05 * float(jnp.abs(out32).max()))
