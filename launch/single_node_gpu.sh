#!/usr/bin/env bash
# One machine, all its GPUs, one process (JAX drives every local GPU from one process).
#
#   launch/single_node_gpu.sh configs/sit_xl.py /runs/sit_xl \
#       --config.data.latent_dir=/data/in256_latents --config.data.neighbors_dir=/data/in256_neighbors
#
# CUDA_VISIBLE_DEVICES selects GPUs. Rerunning the same command resumes from the latest checkpoint.
set -euo pipefail
CONFIG=${1:?config}; WORKDIR=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
python -m groupdiff_jax.main --config="$CONFIG" --workdir="$WORKDIR" --mode=describe --describe_xla_check=false "$@"
exec python -m groupdiff_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
