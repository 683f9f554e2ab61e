"""Base config: the official GroupDiff-l-4 recipe (SiT objective).

Other configs import this and change a few fields. Every field can be
overridden on the command line, e.g. `--config.model.variant=SiT-B/2`.

Configs are given by path, from any working directory
(`--config=/path/to/configs/digits.py`): groupdiff_jax.main makes the name
`configs` mean this folder (groupdiff_jax/config_files.py), so a config
file of your own, anywhere, can start from a shipped one with
`from configs import digits` (or `default`) and change a few fields.

Official GroupDiff defaults: AdamW lr 1e-4 constant, betas (0.9, 0.95),
weight decay 0.01 by the official parameter-name rule (train_step.decay_mask),
clipping at global norm 3.0, EMA 0.9999, 256 images per step, 10% of the
images in unconditional groups of 4 inside every step (GroupDiff-l, mixed
step: docs/method.md), shared time within a group (timestep_jitter 0).
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.variant = 'SiT-XL/2'  # {SiT,DiT}-{S,B,L,XL}/{2,4,8}
  config.model.objective = 'sit'  # 'sit' (transport) | 'dit' (DDPM, learned sigma, hybrid loss)
  config.model.path = 'linear'  # SiT path: 'linear' | 'gvp' | 'vp'
  config.model.prediction = 'velocity'  # SiT prediction: 'velocity' | 'noise' | 'score'
  config.model.loss_weight = ''  # SiT noise/score loss weight: '' | 'velocity' | 'likelihood'
  config.model.depth = 0  # 0: from the variant; >0 overrides it
  config.model.hidden_size = 0
  config.model.num_heads = 0
  config.model.mlp_ratio = 4.0  # MLP width / hidden size
  config.model.input_size = 32  # latent side (256 px / 8)
  config.model.in_channels = 4
  config.model.num_classes = 1000
  config.model.learn_sigma = True  # as official SiT/DiT; SiT uses the first half only
  config.model.max_group_size = 4  # rows of the sample embedding; 0 removes it
  config.model.group_layers = ()  # (start, stop) blocks with group attention; () = all
  config.model.attention_impl = 'xla'  # 'xla' | 'chunked' | 'cudnn' | 'splash' | 'auto' (by backend and length)
  config.model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16'
  config.model.remat = 'none'  # activation rematerialisation per block: 'none' | 'full' | 'dots_saveable'
  # 'sit': our time (0 = noise) and velocity (data - noise); 'groupdiff_official': imported official
  # GroupDiff/REPA SiT weights (their t = 1 is noise, velocity noise - data), see models/dit.py
  config.model.time_convention = 'sit'

  # Device mesh (sharding.py): sizes of the `data`, `fsdp` (and `group`) axes, data or fsdp may
  # be -1 (= the rest); dcn_* is the across-slice/host part of each axis
  # (with dcn_* > 1, data and fsdp are the sizes inside one slice/host).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.dcn_data = 1
  config.mesh.dcn_fsdp = 1
  config.mesh.min_sharded_size = 2**14  # smaller parameter leaves stay replicated
  # Group parallelism: the members of one group split over `group` devices (a divisor of the group size,
  # or groups whole per device); their group attention exchanges heads for members ('all_to_all',
  # Ulysses; where the group spans the whole axis and the heads divide by it, else keys/values are
  # gathered) or gathers keys/values over that axis ('all_gather'). all_to_all compiled cheaper for the
  # official groups step on v5e-256 (roofline -4%) and v5p-256 (libtpu estimate -1.5%, peak -0.1 GiB;
  # docs/scaling.md). 0: the smallest split the batch needs (1 wherever whole groups fit the data x fsdp
  # shards; sharding.auto_group).
  config.mesh.group = 0
  config.mesh.group_collective = 'all_to_all'
  # ZeRO-2: float32 parameters, EMA and optimizer state split over the data (and group) axes, gradients
  # reduced into each device's slice, parameters all-gathered once per step in the compute dtype
  # (sharding.py, train_step.gather_for_compute). On by default: it lowers the compiled step's peak memory
  # and estimated time (docs/scaling.md); nothing changes on one device.
  config.mesh.shard_update = True

  # --mode=compile (compile_job.py): the pod's programs compiled for an
  # abstract TPU topology (needs libtpu: pip install -e '.[tpu]') or for GPUs
  # without one (gpu_topology.py).
  config.compile = ml_collections.ConfigDict()
  # TPU (get_topology_desc names: v4:2x2x4, v5e:8x8, v5p:4x4x4, v6e:8x8) or GPU (h100:8, h100:4x8 = 4 hosts of 8,
  # h200:8; needs pip install -e '.[gpu-compile]')
  config.compile.topology = 'v5p:2x2x2'
  config.compile.num_slices = 1  # > 1: multi-slice; mesh.dcn_data * mesh.dcn_fsdp must equal it
  config.compile.headroom = 0.1  # fits when the peak bytes per device <= (1 - headroom) * HBM
  # refused before compiling when describe's estimate per device exceeds precheck_ratio x (1 - headroom) x HBM;
  # 0 always compiles (the compiler's own verdict)
  config.compile.precheck_ratio = 2.0
  config.compile.sampler = True  # also compile the sample job's sampling call (False: train steps only)
  config.compile.step_kinds = ''  # train step kinds to compile, e.g. 'singles' or 'singles,groups'; '' = all
  config.compile.workers = 0  # programs compiled side by side (0: one per CPU core); 1 saves host memory
  # Also write each program's optimized HLO to DIR/hlo/<program>.txt (benchmarks/collective_table.py lists
  # its collectives op by op: which jax op each comes from, how often it runs, how many bytes).
  config.compile.save_hlo = False
  # Also compile the first step kind's forward, forward at 2x the batch and forward + backward, and split
  # the step's HBM bytes into forward weights / activations, backward and update (step_breakdown.py).
  config.compile.breakdown = False

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256  # images per step, global
  config.train.num_steps = 4_000_000
  config.train.mode = 'groupdiff_l'  # 'groupdiff_l' | 'groupdiff_f'
  config.train.group_size = 4  # N of the unconditional groups
  config.train.group_ratio = 0.1  # fraction of images in unconditional groups
  # True: singles and unconditional groups in every step (official composition, docs/method.md); False:
  # alternate pure singles and pure group steps (our earlier default)
  config.train.mixed_steps = True
  config.train.timestep_jitter = 0.0  # intra-group time offset, fraction of [0, 1]
  # Label dropout applies only when group_ratio is 0 (plain SiT/DiT); with
  # group steps, the unconditional groups are the CFG dropout.
  config.train.label_dropout = 0.1
  config.train.fixed_sample_ids = False
  config.train.log_every = 100
  config.train.checkpoint_every = 10_000
  config.train.max_checkpoints = 3
  config.train.max_nonfinite_steps = 10  # stop after this many skipped (NaN/inf) steps in a row
  # While training (train_monitor.py): a grid of sample.grid_groups groups (EMA, the config's sampler, fixed
  # noise) every sample_every steps into TensorBoard and <workdir>/progress/step_<k>.png; FID of
  # eval.num_samples samples every eval_every steps (needs eval.reference_batch and eval.inception_graph;
  # on data.name='toy_shapes' the toy evaluator's FD instead, evaluation/toy_features.py);
  # 0 = off. profile_steps=(start, stop): a jax.profiler trace of those steps into <workdir>/profile/ on
  # process profile_process.
  config.train.sample_every = 0
  config.train.eval_every = 0
  config.train.profile_steps = ()
  config.train.profile_process = 0
  config.train.poison_step = -1  # tests: this step's images become NaN (-1: never)
  # tests/debugging: after this step the process sends itself train.signal_name, as Ctrl-C (SIGINT) or a
  # scheduler (SIGTERM) would; 0: a new run, just before its first step is compiled; -1: never
  config.train.signal_at_step = -1
  config.train.signal_name = 'SIGINT'
  # Start a new run (step 0, fresh optimizer) from the weights of another workdir or of convert.py's
  # output: its EMA params become params and EMA. Ignored once the workdir has a checkpoint (resume).
  config.train.init_from = config_dict.placeholder(str)

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-4
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.01
  config.optim.grad_clip = 3.0  # 0 disables clipping
  config.optim.ema_decay = 0.9999

  # The batch source (train.make_batches): 'imagenet_latents' / 'latents' (a latent store, data/pipeline.py),
  # or the in-memory 'digits' | 'toy_shapes' | 'fashion_mnist' (data/array_batches.py). Every source's fields
  # are here; each source reads only its own.
  config.data = ml_collections.ConfigDict()
  config.data.name = 'imagenet_latents'
  config.data.grouping = 'official_plan'  # 'official_plan' (similarity) | 'class' | 'random'; latents: 'tau_random'
  # latents: latents.npy, labels.npy, meta.json (docs/method.md, Data formats; extract_latents_job)
  config.data.latent_dir = ''
  # neighbors.npy (+ scores.npy, meta.json for latents; neighbors_job); fashion_mnist: '' = the pixels' PCA
  config.data.neighbors_dir = ''
  config.data.tau = 0.7  # latents, grouping 'tau_random': cosine threshold (paper)
  config.data.random_flip = False  # latents: the store's flipped copies (when it holds them)
  config.data.prefetch = 2  # latents: steps assembled ahead
  config.data.image_size = 32  # in-memory sources: image side in pixels (= model.input_size)
  config.data.embedding_dims = 32  # in-memory sources: PCA dimensions of the similarity embedding
  config.data.num_neighbors = 16  # in-memory sources: neighbours per image for the epoch plan
  config.data.num_images = 20_000  # toy_shapes: images generated
  config.data.dataset_seed = 0  # toy_shapes: the generated data's seed
  config.data.textures = 'solid,stripes,dots'  # toy_shapes: comma-separated names of toy_shapes.TEXTURES
  config.data.size_range = (0.35, 0.7)  # toy_shapes: uniform shape radius (half image widths)
  config.data.data_dir = ''  # fashion_mnist: the IDX files; '' = the Debian package's /usr/share/datasets/fashion-mnist

  config.sample = ml_collections.ConfigDict()
  config.sample.sampler = 'heun'  # SiT: 'euler' | 'heun' | 'sde' | 'dopri5'; DiT: 'ddpm' | 'ddim'
  config.sample.num_steps = 125  # fixed-step samplers; DiT: respaced steps unless timestep_respacing
  config.sample.timestep_respacing = ''  # DiT: e.g. '250' or 'ddim50' ('' = str(num_steps))
  config.sample.sde_diffusion_form = 'SBDM'  # SiT SDE: 'SBDM' | 'sigma' | 'constant'
  config.sample.sde_diffusion_norm = 1.0
  config.sample.sde_last_step = 'Mean'  # 'Mean' | 'Euler' | 'Tweedie' | 'none'
  config.sample.sde_last_step_size = 0.04
  config.sample.ode_atol = 1e-6  # dopri5
  config.sample.ode_rtol = 1e-3
  config.sample.num_groups = 8
  config.sample.images_per_group = 4  # images generated jointly (same class)
  config.sample.cond_group_size = 1  # GroupDiff-l: conditional branch per image
  config.sample.uncond_group_size = 4  # unconditional branch over the group
  config.sample.cfg_scale = 1.5
  config.sample.guidance_low = 0.0
  config.sample.guidance_high = 1.0
  config.sample.guided_channels = 0  # 0: all channels; 3: first three (official "legacy")
  config.sample.group_stage_fraction = 1.0  # group attention for this first (noisiest) fraction of the trajectory
  config.sample.fixed_sample_ids = False
  config.sample.use_ema = True
  # The sample job (sample_job.py): chunks, decoding, outputs.
  config.sample.groups_per_batch = 32  # groups per chunk (one jitted call), split over the local devices by group
  config.sample.vae_path = config_dict.placeholder(str)  # latent models: SD-VAE diffusion_pytorch_model.safetensors
  config.sample.decode_batch_size = 64  # latents per VAE decode call (bounds memory)
  config.sample.grid_groups = 10  # groups (rows) in samples.png
  config.sample.s_cross = False  # measure S_cross (docs/method.md, S_cross) on the first s_cross_groups groups
  config.sample.s_cross_stages = (0.25, 0.5, 0.75)  # fractions of the trajectory done (from the noise end)
  config.sample.s_cross_groups = 8

  # --mode=eval: the ADM evaluator on <workdir>/samples/samples_*.npz.
  config.eval = ml_collections.ConfigDict()
  config.eval.reference_batch = config_dict.placeholder(str)  # e.g. VIRTUAL_imagenet256_labeled.npz (guided-diffusion)
  config.eval.inception_graph = config_dict.placeholder(str)  # classify_image_graph_def.pb (guided-diffusion)
  config.eval.num_samples = 10_000  # train.eval_every: samples per FID during training (scalar fid_10k)
  config.eval.toy_feature_steps = 3000  # toy_shapes: training steps of the FD scorer (once, saved in the workdir)
  return config
