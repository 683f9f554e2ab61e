"""Frozen pretrained encoders around the diffusion model: the SD-VAE (vae.py, weights via vae_weights.py) and the
DINOv2 / CLIP image towers (dinov2.py, clip.py on vit.py) used to find neighbours; weights imported by weights_io.py.
"""
