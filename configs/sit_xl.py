"""SiT-XL/2 + GroupDiff-l-4 on ImageNet 256 latents: the official recipe.

  python -m groupdiff_jax.main --config=configs/sit_xl.py --workdir=gs://BUCKET/sit_xl_gdiff4 \
      --config.data.latent_dir=/data/in256_latents --config.data.neighbors_dir=/data/in256_neighbors

Official GroupDiff (docs/method.md): AdamW lr 1e-4 constant, betas
(0.9, 0.95), weight decay 0.01 by the official name rule, clip 3.0, EMA 0.9999,
256 images per step, 10% of the images in unconditional groups of 4
(GroupDiff-l; here steps alternate singles and groups, see get_config),
neighbours from DINOv2-L/14 CLS embeddings with the official epoch plan,
shared time in a group, bf16 compute with float32 parameters.
800 epochs of 1,281,167 images = 4.0M steps. Paper: FID-50K 1.63 (IS 283.2)
at 800 epochs, CFG sampling as in configs' `sample` section.

Variants from the command line: `--config.train.mode=groupdiff_f`,
`--config.train.group_size=8 --config.model.max_group_size=8`,
`--config.data.grouping=tau_random`, `--config.mesh.fsdp=4`,
`--config.model.remat=dots_saveable`. Cost of a config without training:
`--mode=describe`.

Mesh per TPU pod (compiled for each, docs/scaling.md; the default mesh is
all devices on `data`, with the sharded update, mesh.shard_update): v5e-64
`--config.mesh.fsdp=4` at batch 256; v5e-256 `--config.train.batch_size=1024
--config.mesh.fsdp=4`; every other pod and batch of the table the default
(v5p-64, v6e-64, v4-32, v5p-256; v5e-64 and v4-32 at batch 1024 since the
sharded update). Batch 256 on more than 64 devices (v5e-256, v5p-256)
splits each group of 4 over 4 or 2 devices (mesh.group=0, the default). The same table as code:
configs/pod_meshes.py (launch/tpu_pod.sh applies it). `--mode=compile
--config.compile.topology=v5e:8x8` checks a choice in minutes.

The latent store and neighbour lists (docs/method.md, Data formats) come from the
data jobs; training refuses to start without them (train.check_data).
"""

from configs import default

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(variant='SiT-XL/2'):
  config = default.get_config()
  config.model.variant = variant
  config.model.max_group_size = 4
  config.model.dtype = 'bfloat16'  # compute; parameters and optimizer state stay float32
  config.model.attention_impl = 'auto'  # cuDNN on GPU, splash on TPU, chunked on CPU (XLA up to 256 tokens)
  config.model.remat = 'none'

  config.train.batch_size = 256
  config.train.mode = 'groupdiff_l'
  config.train.group_size = 4
  config.train.group_ratio = 0.1
  # Alternating pure singles / pure group steps on pods: a mixed step of 256 images (232 singles and 6
  # groups of 4, docs/method.md) splits over at most 2 data shards (6 groups, whole groups per device);
  # the official per-GPU batches of one kind each have no static-shape SPMD form. Mixed on <= 2 devices:
  # --config.train.mixed_steps=True.
  config.train.mixed_steps = False
  config.train.num_steps = 800 * IMAGENET_TRAIN_IMAGES // 256  # 800 epochs
  config.train.log_every = 100
  config.train.checkpoint_every = 10_000
  # A grid of sample.grid_groups = 10 groups of 4 (Heun 125 = 250 NFE, both CFG branches) costs about
  # 5.0e15 FLOPs = 27 train steps (1.8e14 FLOPs each, describe.py): every 5,000 steps it is 0.55% of the
  # training compute (train_monitor.grid_cost; tests/test_monitoring.py keeps it under 2%).
  config.train.sample_every = 5_000
  # FID of eval.num_samples = 10K samples costs about 6,900 train steps: eval_every=400_000 is ~1.7%.
  # Off by default: it needs eval.reference_batch and eval.inception_graph.
  config.train.eval_every = 0

  config.data.name = 'latents'
  config.data.latent_dir = '/data/in256_latents'  # latents.npy, labels.npy, meta.json
  config.data.neighbors_dir = '/data/in256_neighbors'  # neighbors.npy, scores.npy, meta.json
  config.data.grouping = 'official_plan'  # 'official_plan' | 'tau_random' | 'class' | 'random'
  config.data.tau = 0.7  # tau_random only

  config.sample.sampler = 'heun'
  config.sample.num_steps = 125
  config.sample.cfg_scale = 1.5
  return config
