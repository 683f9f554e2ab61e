"""Evaluate the released GroupDiff-l-4 DiT-XL/2 checkpoint (official FID-50K settings).

  python -m groupdiff_jax.convert --source=released_model/gdiff-l-4-dit-xl-2-resume.pth \
      --output=/ckpt/gdiff-l-4-dit-xl-2 --variant=DiT-XL/2
  python -m groupdiff_jax.main --config=configs/eval_gdiff_dit_xl.py --workdir=/ckpt/gdiff-l-4-dit-xl-2 \
      --mode=sample --config.sample.vae_path=/weights/sd-vae-ft-mse/diffusion_pytorch_model.safetensors
  python -m groupdiff_jax.main --config=configs/eval_gdiff_dit_xl.py --workdir=/ckpt/gdiff-l-4-dit-xl-2 \
      --mode=eval --config.eval.reference_batch=/data/VIRTUAL_imagenet256_labeled.npz \
      --config.eval.inception_graph=/data/classify_image_graph_def.pb

The sample job (groupdiff_jax/sample_job.py) writes 12,500 groups of 4 in
chunks of sample.groups_per_batch groups to /ckpt/gdiff-l-4-dit-xl-2/samples/, over
every host and device (rerun the same command after a preemption: finished
chunks are kept), decodes the latents with the SD-VAE (sd-vae-ft-mse, as the
official sampler: `huggingface-cli download stabilityai/sd-vae-ft-mse
diffusion_pytorch_model.safetensors --local-dir /weights/sd-vae-ft-mse`) and
assembles samples_50000x256x256x3.npz; --mode=eval runs the ADM evaluator on
it (reference batch and Inception graph from openai/guided-diffusion's
evaluations/README.md) and writes samples_50000x256x256x3.eval.json.

(`.pth` needs torch for the conversion only; see groupdiff_jax/convert.py for
the safetensors route.) Settings as the official README's evaluation of this
checkpoint (docs/method.md, Inference): DDPM ancestral over 250 respaced steps,
CFG 1.65 on all 4 channels, guidance interval [0, 1], conditional branch per
image (group 1), unconditional branch over the group of 4, EMA weights,
float32 sampling (FID is sensitive to bf16). Expected: FID-50K 1.66 with the
ADM evaluator against VIRTUAL_imagenet256_labeled.npz (paper, 800 epochs).
"""

from configs import dit_xl


def get_config():
  # The sampling recipe (DDPM 250, CFG 1.65 on all channels, interval [0, 1],
  # groups 1 / 4) is dit_xl's; evaluation adds float32 and the 50K images.
  config = dit_xl.get_config()
  config.model.learn_sigma = True  # the file has 2 * 4 output channels (converted.json records it)
  config.model.max_group_size = 4  # sample_embedder.embedding_table of the file: [4, 1152]
  config.model.dtype = 'float32'  # FID is sensitive to bf16 sampling

  config.sample.num_groups = 12_500  # 50,000 images = 50 per class
  config.sample.fixed_sample_ids = False  # random member ids, as the official sampler
  config.sample.use_ema = True
  return config
