#!/usr/bin/env bash
# One machine, all its GPUs, one process (JAX drives every local GPU from one process).
#
#   launch/single_node_gpu.sh configs/sit_xl.py /runs/sit_xl \
#       --config.data.latent_dir=/data/in256_latents --config.data.neighbors_dir=/data/in256_neighbors
#
# Prints the describe summary (parameters, FLOPs, memory per device), then trains.
# CUDA_VISIBLE_DEVICES selects GPUs; PYTHON the interpreter (default: python, from .venv when there is one).
# Rerunning the same command resumes from the latest checkpoint.
# Exit codes: 0 finished, 2 a mistake in the arguments or config, 75 preempted (checkpoint saved).
set -euo pipefail
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then
  missing=$([ $# = 0 ] && echo "CONFIG and WORKDIR" || echo WORKDIR)
  echo "Error: missing argument $missing. Usage: $0 CONFIG WORKDIR [--config.overrides ...]" >&2
  echo "  e.g. $0 configs/digits.py /tmp/digits" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
PYTHON=${PYTHON:-python}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "Error: PYTHON=$PYTHON is not a command here: activate the virtualenv that has groupdiff_jax, or set PYTHON to its interpreter (e.g. PYTHON=.venv/bin/python)." >&2
  exit 2
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
"$PYTHON" -m groupdiff_jax.main --config="$CONFIG" --workdir="$WORKDIR" --mode=describe --describe_xla_check=false "$@"
exec "$PYTHON" -m groupdiff_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
