"""The denoiser: DiT/SiT blocks with group attention (dit.py), the attention over a group's tokens and its
kernels (group_attention.py), and the timestep, class, sample and position embeddings (embeddings.py).
"""
