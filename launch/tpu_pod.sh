#!/usr/bin/env bash
# Train on a Cloud TPU pod slice (queued resource, preemptible/spot), resuming after preemption.
#
#   ZONE=us-central2-b ACCELERATOR=v4-64 NAME=gdiff BUCKET=gs://my-bucket \
#     CONFIG=configs/sit_xl.py launch/tpu_pod.sh [--config.overrides ...]
#
# 1. creates (or reuses) the queued resource NAME (spot unless SPOT=0) and waits until ACTIVE;
# 2. copies this checkout to every worker and installs it (`--worker=all`);
# 3. runs `python -m groupdiff_jax.main` on every worker (jax.distributed finds the pod by itself);
#    the workdir is in GCS, so a rerun resumes from the latest checkpoint;
# 4. exit 0 of the run: "done". Exit 2 (a mistake in the config or flags): stop, no retry. Exit 130
#    (Ctrl-C: the run saved what it could): stop, no retry; rerun this script to resume.
#    Anything else is a preemption: 75 (SIGTERM / maintenance event, checkpoint saved), ssh's 255
#    (the VM went away), or the slice SUSPENDED/FAILED. Then it re-creates the slice if it is not
#    ACTIVE, reinstalls and reruns, which resumes (at most MAX_RESTARTS times, then exit 1).
# Overrides (mesh included, e.g. --config.mesh.fsdp=8) pass through unchanged to every worker.
# Mesh: for configs/sit_xl.py and configs/dit_xl.py the mesh (and remat) that fits ACCELERATOR at the batch
# (256, or --config.train.batch_size N) comes from configs/pod_meshes.py and goes before your overrides;
# any --config.mesh.*, train.mode, train.group_size or model.remat of yours turns it off (the presets are
# for GroupDiff-l-4 and set the whole mesh). A pod that cannot run that batch stops here (exit 2).
# MESH_PRESET=0 turns this off.
# POLL_SECONDS (60) between state checks, RETRY_SECONDS (30) before a restart.
# ImageNet latents: the latent store and neighbour lists are memory-mapped, so they must be on each worker's
# local disk (a gs:// data.latent_dir is refused). LATENTS_URI=gs://.../latents NEIGHBORS_URI=gs://.../neighbors
# copies them (`gcloud storage rsync -r`, at every install) to LOCAL_DATA (/tmp/groupdiff_data) on every worker
# and passes --config.data.latent_dir / neighbors_dir pointing there.
set -euo pipefail
usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
for var in ZONE ACCELERATOR NAME BUCKET; do
  if [ -z "${!var:-}" ]; then
    echo "Error: $var is not set. Example:" >&2
    echo "  ZONE=us-central2-b ACCELERATOR=v4-64 NAME=gdiff BUCKET=gs://my-bucket CONFIG=configs/sit_xl.py $0" >&2
    exit 2
  fi
done
CONFIG=${CONFIG:-configs/sit_xl.py}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
WORKDIR=${WORKDIR:-$BUCKET/$NAME}
SPOT=${SPOT:-1}
MAX_RESTARTS=${MAX_RESTARTS:-20}
POLL_SECONDS=${POLL_SECONDS:-60}
RETRY_SECONDS=${RETRY_SECONDS:-30}
MESH_PRESET=${MESH_PRESET:-1}
EXIT_USER_ERROR=2  # groupdiff_jax/errors.py
EXIT_PREEMPTED=75
EXIT_INTERRUPTED=130
REPO_DIR=groupdiff_jax
LOCAL_DATA=${LOCAL_DATA:-/tmp/groupdiff_data}
data_flags=""; stage_data=":"
if [ -n "${LATENTS_URI:-}" ]; then
  data_flags="--config.data.latent_dir=$LOCAL_DATA/latents"
  stage_data="$stage_data && mkdir -p $LOCAL_DATA/latents && gcloud storage rsync -r $LATENTS_URI $LOCAL_DATA/latents"
fi
if [ -n "${NEIGHBORS_URI:-}" ]; then
  data_flags="$data_flags --config.data.neighbors_dir=$LOCAL_DATA/neighbors"
  stage_data="$stage_data && mkdir -p $LOCAL_DATA/neighbors && gcloud storage rsync -r $NEIGHBORS_URI $LOCAL_DATA/neighbors"
fi
TPU="gcloud compute tpus tpu-vm"
QR="gcloud compute tpus queued-resources"

state() { $QR describe "$NAME" --zone="$ZONE" --format='value(state.state)' 2>/dev/null || echo MISSING; }

create() {
  case "$(state)" in
    ACTIVE) return ;;
    MISSING) ;;
    *) $QR delete "$NAME" --zone="$ZONE" --force --quiet || true ;;
  esac
  $QR create "$NAME" --node-id="$NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --runtime-version="$RUNTIME" $([ "$SPOT" = 1 ] && echo --spot)
  local s
  while s=$(state); [ "$s" != ACTIVE ]; do echo "waiting for $NAME: $s"; sleep "$POLL_SECONDS"; done
}

install() {
  tar czf "${TMPDIR:-/tmp}/$REPO_DIR.tgz" --exclude=.git --exclude='.venv' .
  $TPU scp "${TMPDIR:-/tmp}/$REPO_DIR.tgz" "$NAME":/tmp/ --zone="$ZONE" --worker=all
  $TPU ssh "$NAME" --zone="$ZONE" --worker=all --command="
    set -e; mkdir -p ~/$REPO_DIR && tar xzf /tmp/$REPO_DIR.tgz -C ~/$REPO_DIR && cd ~/$REPO_DIR &&
    python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip &&
    pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html &&
    ( $stage_data )"
}

run() {
  local quoted=""  # each argument quoted for the remote shell: an override with spaces stays one argument
  if [ "$#" -gt 0 ]; then quoted=$(printf ' %q' "$@"); fi
  $TPU ssh "$NAME" --zone="$ZONE" --worker=all --command="
    cd ~/$REPO_DIR && . .venv/bin/activate &&
    JAX_DISTRIBUTED_AUTO=1 python -m groupdiff_jax.main --config=$CONFIG --workdir=$WORKDIR$quoted"
}

cd "$(dirname "$0")/.."
mesh_flags=""
if [ "$MESH_PRESET" = 1 ] && { [ "$CONFIG" = configs/sit_xl.py ] || [ "$CONFIG" = configs/dit_xl.py ]; }; then
  batch=256 own_mesh=""
  previous=""
  for arg in "$@"; do
    case "$arg" in
      --config.train.batch_size=*) batch=${arg#*=} ;;
      --config.mesh.*|--config.train.mode*|--config.train.group_size*|--config.model.remat*) own_mesh=${arg%%=*} ;;
    esac
    if [ "$previous" = --config.train.batch_size ]; then batch=$arg; fi  # the two-argument form
    previous=$arg
  done
  if [ -n "$own_mesh" ]; then
    # The presets are measured for GroupDiff-l-4 with their own (data, fsdp) and remat: with any of these set
    # by hand, a preset flag beside it could make a mesh that does not multiply out.
    echo "mesh preset off: $own_mesh is given (configs/pod_meshes.py is for GroupDiff-l-4 and sets the whole mesh)"
  else
    mesh_flags=$(python3 configs/pod_meshes.py "$ACCELERATOR" "$batch") || exit "$EXIT_USER_ERROR"
    echo "mesh for $ACCELERATOR at batch $batch: ${mesh_flags:-as in the config (no entry in configs/pod_meshes.py)}"
  fi
fi
for attempt in $(seq 0 "$MAX_RESTARTS"); do
  create
  install
  code=0; run $mesh_flags $data_flags "$@" || code=$?
  if [ "$code" = 0 ]; then echo "done: $WORKDIR"; exit 0; fi
  if [ "$code" = "$EXIT_USER_ERROR" ]; then
    echo "run failed (exit $code: see the error above); not retrying" >&2; exit "$code"
  fi
  if [ "$code" = "$EXIT_INTERRUPTED" ]; then
    echo "run interrupted (Ctrl-C); not retrying: rerun this script to resume from $WORKDIR" >&2; exit "$code"
  fi
  case "$code" in
    "$EXIT_PREEMPTED") why="preempted, checkpoint saved" ;;
    255) why="ssh lost the workers" ;;
    *) why="exit $code" ;;
  esac
  if [ "$attempt" = "$MAX_RESTARTS" ]; then break; fi
  echo "run stopped ($why); slice state $(state); restart $((attempt + 1))/$MAX_RESTARTS"
  sleep "$RETRY_SECONDS"
done
echo "giving up after $MAX_RESTARTS restarts; rerun this script to resume from $WORKDIR" >&2
exit 1
