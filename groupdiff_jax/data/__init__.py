"""Training data: the input pipeline (pipeline.py: groups of same-class neighbours per step), its sources
(digits, toy shapes, TFDS, latent stores) and grouping, plus three data-preparation jobs (extract_latents_job.py,
embeddings_job.py, neighbors_job.py: CLIs that write the latent store and neighbour tables the pipeline reads).
"""
