"""Device check (one GPU): Flax DINOv2/CLIP towers vs transformers' PyTorch models, full-size key layouts,
exact JAX neighbour search and SD-VAE encode throughput.

  PYTHONPATH=. python3 benchmarks/device_check_encoders_neighbors.py   (ONLY=<word> runs the sections naming it)

Needs torch + transformers (reference only) and jax with a GPU; each section reports on its own.
"""

import os
import time
import traceback

import numpy as np


def section(name):
  def wrap(fn):
    if os.environ.get('ONLY') and os.environ['ONLY'] not in name:
      return
    print(f'== {name}', flush=True)
    start = time.time()
    try:
      fn()
    except Exception:  # report and go on to the next section
      traceback.print_exc()
    print(f'   ({time.time() - start:.1f} s)', flush=True)
  return wrap


@section('DINOv2 tiny: Flax vs transformers Dinov2Model (random weights, 3x3 grid -> 2x2)')
def _():
  import dataclasses, torch, transformers, jax
  from groupdiff_jax.encoders import dinov2, vit
  cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  image_size=42, patch_size=14, layerscale_value=0.5)
  model = transformers.Dinov2Model(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  ours = dataclasses.replace(dinov2.DINOV2_L14, hidden_size=32, depth=2, num_heads=4, mlp_dim=128, image_size=28)
  params = dinov2.convert(state, ours)
  x = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output.numpy()
  got = np.asarray(jax.jit(vit.ViT(ours).apply)({'params': params}, x))
  print('   max |diff|', np.abs(got - want).max(), 'scale', np.abs(want).max())


@section('CLIP tiny: Flax vs transformers CLIPVisionModelWithProjection')
def _():
  import dataclasses, torch, transformers, jax
  from groupdiff_jax.encoders import clip, vit
  cfg = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      image_size=28, patch_size=14, projection_dim=16)
  model = transformers.CLIPVisionModelWithProjection(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  ours = dataclasses.replace(clip.CLIP_L14, hidden_size=32, depth=2, num_heads=4, mlp_dim=64, image_size=28,
                             projection_dim=16)
  params = clip.convert(state, ours)
  x = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).image_embeds.numpy()
  got = np.asarray(jax.jit(vit.ViT(ours).apply)({'params': params}, x))
  print('   max |diff|', np.abs(got - want).max(), 'scale', np.abs(want).max())


@section('Full-size layouts: every key of dinov2-large / dinov2-base / clip-vit-large-patch14 converts')
def _():
  import torch, transformers
  from groupdiff_jax.encoders import clip, dinov2
  def shapes_to_zeros(model):
    return {k: np.zeros(tuple(v.shape), np.float32) for k, v in model.state_dict().items()}
  with torch.device('meta'):
    l = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=1024, num_hidden_layers=24,
                                 num_attention_heads=16, image_size=518, patch_size=14))
    b = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=768, num_hidden_layers=12,
                                 num_attention_heads=12, image_size=518, patch_size=14))
    c = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           image_size=224, patch_size=14, projection_dim=768), projection_dim=768))
  for name, model, fn, cfg in (('dinov2-large', l, dinov2.convert, dinov2.DINOV2_L14),
                               ('dinov2-base', b, dinov2.convert, dinov2.DINOV2_B14),
                               ('clip-l14', c, clip.convert, clip.CLIP_L14)):
    params = fn(shapes_to_zeros(model), cfg)
    import jax
    print(f'   {name}: {sum(x.size for x in jax.tree.leaves(params)):,} params converted')


@section('Exact neighbours with JAX on the GPU: 100k x 1024, K=100')
def _():
  import jax
  from groupdiff_jax.data import retrieval
  print('   devices', jax.devices())
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((1000, 1024)).astype(np.float32)
  emb = retrieval.l2_normalize(centres[rng.integers(0, 1000, 100_000)] + 0.7 * rng.standard_normal((100_000, 1024)))
  retrieval.exact_neighbors(emb, 100, query_rows=np.arange(1024), batch_size=1024)  # compile
  start = time.time()
  found, scores = retrieval.exact_neighbors(emb, 100, batch_size=1024)
  seconds = time.time() - start
  q = rng.choice(100_000, 50, replace=False)
  sims = emb[q] @ emb.T
  sims[np.arange(50), q] = -np.inf
  exact = np.argsort(-sims, axis=1)[:, :100]
  print(f'   all 100k rows in {seconds:.1f} s; recall vs numpy {retrieval.recall_at_k(found[q], exact):.4f}')


@section('SD-VAE encode throughput (random weights, 256 px, batch 64)')
def _():
  import jax, jax.numpy as jnp
  from groupdiff_jax.data import extract_latents_job
  from groupdiff_jax.encoders import vae as vae_lib
  for dtype in ('float32', 'bfloat16'):
    vae = vae_lib.AutoencoderKL(vae_lib.SD_VAE_CONFIG, dtype=jnp.dtype(dtype))
    shapes = jax.eval_shape(vae.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))['params']
    params = jax.tree.map(lambda s: 0.02 * jax.random.normal(jax.random.PRNGKey(1), s.shape), shapes)
    encode, _ = extract_latents_job.make_encoder(vae, params, 'sample', True, jnp.float16)
    images = np.random.default_rng(0).integers(0, 256, (64, 256, 256, 3), np.uint8)
    jax.block_until_ready(encode(images, jax.random.PRNGKey(0)))
    start = time.time()
    for i in range(5):
      out = encode(images, jax.random.PRNGKey(i))
    jax.block_until_ready(out)
    print(f'   {dtype}: {5 * 64 / (time.time() - start):.0f} images/s (with flip: 2 encodes each), out {out.shape}')
