"""GroupDiff in JAX/Flax: group diffusion (DiT/SiT with attention across a group of same-class images).

Two layers, imports one way (README, "Layout"): the jobs (`main.py` and the
CLIs it dispatches to: `train.py`, `sample_job.py`, `compile_job.py`, and
`convert.py`, `data/*_job.py`) import the library (everything else: models/,
transport.py, diffusion/, samplers.py, sample.py, sharding.py, checkpoint.py,
weights_io.py, evaluation/, ...); no library module imports a job
(tests/test_layers.py).
"""
