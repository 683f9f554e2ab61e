"""Frozen encoders used around the diffusion model: the SD-VAE (`vae.py`, weights via `vae_weights.py`)."""
