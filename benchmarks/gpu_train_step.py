"""SiT-XL/2 train-step throughput on one GPU: groupdiff_jax vs a PyTorch DiT.

Measures, in one process and one run, side by side:
  * groupdiff_jax's jitted train step (bf16 compute, fp32 params, AdamW with
    clipping, EMA) for the two GroupDiff-l step kinds: singles (N=1) and
    unconditional groups of N=4;
  * the same-size DiT/SiT train step written in PyTorch (bf16 autocast,
    scaled_dot_product_attention, fused AdamW, EMA), eager and, unless
    --skip_torch_compile, torch.compile'd. Torch is needed only here; it is
    no dependency of the package.

Images/s and model FLOP utilisation (MFU): model FLOPs per image from the
analytic count below (DiT's "119 GFLOPs" for XL/2 are multiply-adds: x2 for
FLOPs, x3 for forward+backward), divided by the step time, as a fraction of
the GPU's dense bf16 peak (--peak_tflops, 989 for an H100 SXM).

  python benchmarks/gpu_train_step.py --batch_size=64
"""

import argparse
import json
import math
import sys
import time
import types

import numpy as np


def dit_forward_macs(depth, hidden, patch, input_size=32, in_channels=4, out_channels=8, group_size=1):
  """Multiply-adds of one image's forward pass (attention over N*L tokens)."""
  tokens = (input_size // patch)**2
  per_token = 12 * hidden * hidden  # qkv 3C^2 + proj C^2 + MLP 8C^2
  attention = 2 * tokens * (group_size * tokens) * hidden  # QK^T and AV against the whole group
  adaln = 6 * hidden * hidden  # per image, per block
  blocks = depth * (tokens * per_token + attention + adaln)
  embed = tokens * patch * patch * in_channels * hidden + 256 * hidden + hidden * hidden
  final = tokens * hidden * patch * patch * out_channels + 2 * hidden * hidden
  return blocks + embed + final


def time_steps(step, state, batch, warmup, iters, sync):
  for _ in range(warmup):
    state = step(state, batch)
  sync(state)
  start = time.perf_counter()
  for _ in range(iters):
    state = step(state, batch)
  sync(state)
  return (time.perf_counter() - start) / iters, state


def bench_jax(args):
  import jax
  import jax.numpy as jnp
  from groupdiff_jax import sharding, step_plan, train_step
  from groupdiff_jax.models import dit

  arch = dit.parse_variant(args.variant)
  model = dit.DiT(**arch, input_size=32, in_channels=4, learn_sigma=True, max_group_size=4,
                  attention_impl=args.attention_impl, dtype=jnp.bfloat16)
  config = types.SimpleNamespace(
      model=types.SimpleNamespace(input_size=32, in_channels=4, max_group_size=4, num_classes=1000),
      train=types.SimpleNamespace(label_dropout=0.1, group_ratio=0.1, timestep_jitter=0.0, fixed_sample_ids=False),
      optim=types.SimpleNamespace(lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, grad_clip=3.0,
                                  ema_decay=0.9999))
  mesh = sharding.make_mesh()
  replicated = sharding.replicated(mesh)
  state = jax.jit(lambda k: train_step.create_train_state(model, config, k), out_shardings=replicated)(
      jax.random.PRNGKey(0))
  run = train_step.make_jitted_train_step(config, mesh, replicated)
  kinds = step_plan.step_kinds(args.batch_size, 4, 0.1)
  rng = np.random.default_rng(0)
  results = {}
  for name, group_size in (('singles', 1), ('groups', 4)):
    kind = kinds[name]
    batch = tuple({'images': jnp.asarray(rng.standard_normal((s.num_images, 32, 32, 4)), jnp.float32),
                   'labels': jnp.asarray(rng.integers(0, 1000, s.num_images), jnp.int32)} for s in kind)
    compile_start = time.perf_counter()
    state, metrics = run(state, batch, kind)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
    seconds, state = time_steps(lambda s, b: run(s, b, kind)[0], state, batch, args.warmup, args.iters,
                                lambda s: jax.block_until_ready(s.params))
    results[f'jax_{name}'] = dict(group_size=group_size, step_s=seconds, compile_s=compile_s,
                                  attention_impl=args.attention_impl)
  return results


def torch_dit(depth, hidden, heads, patch, num_classes=1000, in_channels=4, out_channels=8, input_size=32):
  """A DiT of the official architecture in PyTorch, for the baseline only."""
  import torch
  from torch import nn
  import torch.nn.functional as F

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.qkv = nn.Linear(hidden, 3 * hidden)
      self.proj = nn.Linear(hidden, hidden)
      self.fc1 = nn.Linear(hidden, 4 * hidden)
      self.fc2 = nn.Linear(4 * hidden, hidden)
      self.ada = nn.Linear(hidden, 6 * hidden)

    def forward(self, x, c):
      b, t, d = x.shape
      s1, g1, a1, s2, g2, a2 = self.ada(F.silu(c)).chunk(6, dim=1)
      h = F.layer_norm(x, (d,), eps=1e-6) * (1 + g1[:, None]) + s1[:, None]
      q, k, v = self.qkv(h).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
      h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
      x = x + a1[:, None] * self.proj(h)
      h = F.layer_norm(x, (d,), eps=1e-6) * (1 + g2[:, None]) + s2[:, None]
      return x + a2[:, None] * self.fc2(F.gelu(self.fc1(h), approximate='tanh'))

  class DiT(nn.Module):

    def __init__(self):
      super().__init__()
      self.patch = nn.Conv2d(in_channels, hidden, patch, patch)
      self.t_mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
      self.y_embed = nn.Embedding(num_classes + 1, hidden)
      self.blocks = nn.ModuleList([Block() for _ in range(depth)])
      self.final_ada = nn.Linear(hidden, 2 * hidden)
      self.final = nn.Linear(hidden, patch * patch * out_channels)
      self.register_buffer('pos', torch.zeros(1, (input_size // patch)**2, hidden))

    def forward(self, x, t, y):
      x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
      half = 128
      freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
      args_ = t[:, None].float() * freqs[None]
      c = self.t_mlp(torch.cat([torch.cos(args_), torch.sin(args_)], -1)) + self.y_embed(y)
      for block in self.blocks:
        x = block(x, c)
      shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=1)
      x = self.final(F.layer_norm(x, (hidden,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
      g = input_size // patch
      x = x.reshape(-1, g, g, patch, patch, out_channels)
      return torch.einsum('nhwpqc->nchpwq', x).reshape(-1, out_channels, g * patch, g * patch)

  return DiT()


def bench_torch(args, compiled):
  import torch
  from groupdiff_jax.models import dit as dit_lib
  arch = dit_lib.parse_variant(args.variant)
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = True
  device = args.torch_device
  model = torch_dit(arch['depth'], arch['hidden_size'], arch['num_heads'], arch['patch_size']).to(device)
  ema = [p.detach().clone() for p in model.parameters()]
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01,
                          fused=device == 'cuda')
  forward = torch.compile(model) if compiled else model
  x1 = torch.randn(args.batch_size, 4, 32, 32, device=device)
  y = torch.randint(0, 1000, (args.batch_size,), device=device)

  def step(_, __):
    t = torch.rand(args.batch_size, device=device)
    x0 = torch.randn_like(x1)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    with torch.autocast(device, dtype=torch.bfloat16):
      out = forward(xt, t, y)
    loss = ((out[:, :4].float() - (x1 - x0))**2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
    opt.step()
    with torch.no_grad():
      torch._foreach_mul_(ema, 0.9999)
      torch._foreach_add_(ema, list(model.parameters()), alpha=1e-4)
    return None

  compile_start = time.perf_counter()
  sync = (lambda _: torch.cuda.synchronize()) if device == 'cuda' else (lambda _: None)
  step(None, None)
  sync(None)
  compile_s = time.perf_counter() - compile_start
  seconds, _ = time_steps(step, None, None, args.warmup, args.iters, sync)
  return {f'torch_{"compiled" if compiled else "eager"}': dict(group_size=1, step_s=seconds, compile_s=compile_s)}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--variant', default='SiT-XL/2')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--attention_impl', default='cudnn')
  parser.add_argument('--peak_tflops', type=float, default=989.4, help='dense bf16 peak of the GPU')
  parser.add_argument('--skip_jax', action='store_true', help='run each side in its own process: JAX holds '
                      'on to GPU memory once it has allocated it')
  parser.add_argument('--skip_torch', action='store_true')
  parser.add_argument('--torch_device', default='cuda')
  parser.add_argument('--skip_torch_compile', action='store_true')
  parser.add_argument('--output', default='')
  args = parser.parse_args()

  results = {}
  for name, fn in (('jax', None if args.skip_jax else lambda: bench_jax(args)),
                   ('torch_eager', None if args.skip_torch else lambda: bench_torch(args, False)),
                   ('torch_compiled', None if args.skip_torch or args.skip_torch_compile
                    else lambda: bench_torch(args, True))):
    if fn is None:
      continue
    try:
      results.update(fn())
    except Exception as error:  # report and go on: one failing side must not lose the other's numbers
      print(f'{name} failed: {type(error).__name__}: {error}', file=sys.stderr)
      if name == 'jax' and args.attention_impl != 'xla':
        print('retrying JAX with attention_impl=xla', file=sys.stderr)
        args.attention_impl = 'xla'
        results.update(fn())
    print(json.dumps(results), flush=True)

  from groupdiff_jax.models import dit as dit_lib
  arch = dit_lib.parse_variant(args.variant)
  rows = []
  for name, r in results.items():
    macs = dit_forward_macs(arch['depth'], arch['hidden_size'], arch['patch_size'], group_size=r['group_size'])
    train_flops = 3 * 2 * macs * args.batch_size
    r.update(images_per_s=args.batch_size / r['step_s'], model_tflops=train_flops / r['step_s'] / 1e12,
             gflops_per_image_fwd=2 * macs / 1e9)
    r['mfu'] = r['model_tflops'] / args.peak_tflops
    rows.append(f"| {name} | {r['group_size']} | {r['step_s'] * 1e3:.1f} | {r['images_per_s']:.0f} | "
                f"{r['model_tflops']:.0f} | {100 * r['mfu']:.1f}% | {r['compile_s']:.0f} |")
  print(f'{args.variant}, batch {args.batch_size} images, bf16')
  print('| step | N | ms/step | images/s | model TFLOP/s | MFU | first step s |')
  print('|---|---|---|---|---|---|---|')
  print('\n'.join(rows))
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(dict(args=vars(args), results=results), f, indent=2)


if __name__ == '__main__':
  main()
