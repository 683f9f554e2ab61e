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
# 4. if the slice was preempted (queued resource SUSPENDED/FAILED or the ssh run died), deletes it,
#    queues a new one and goes back to 1 (at most MAX_RESTARTS times).
set -euo pipefail
: "${ZONE:?}" "${ACCELERATOR:?}" "${NAME:?}" "${BUCKET:?}"
CONFIG=${CONFIG:-configs/sit_xl.py}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
WORKDIR=${WORKDIR:-$BUCKET/$NAME}
SPOT=${SPOT:-1}
MAX_RESTARTS=${MAX_RESTARTS:-20}
REPO_DIR=groupdiff_jax
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
  until [ "$(state)" = ACTIVE ]; do echo "waiting for $NAME: $(state)"; sleep 60; done
}

install() {
  tar czf /tmp/$REPO_DIR.tgz --exclude=.git --exclude='.venv' .
  $TPU scp /tmp/$REPO_DIR.tgz "$NAME":/tmp/ --zone="$ZONE" --worker=all
  $TPU ssh "$NAME" --zone="$ZONE" --worker=all --command="
    set -e; mkdir -p ~/$REPO_DIR && tar xzf /tmp/$REPO_DIR.tgz -C ~/$REPO_DIR && cd ~/$REPO_DIR &&
    python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip &&
    pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
}

run() {
  $TPU ssh "$NAME" --zone="$ZONE" --worker=all --command="
    cd ~/$REPO_DIR && . .venv/bin/activate &&
    JAX_DISTRIBUTED_AUTO=1 python -m groupdiff_jax.main --config=$CONFIG --workdir=$WORKDIR $*"
}

for attempt in $(seq 0 "$MAX_RESTARTS"); do
  create
  install
  if run "$@"; then echo "done: $WORKDIR"; exit 0; fi
  echo "run ended with an error (preempted?): state $(state); restart $((attempt + 1))/$MAX_RESTARTS"
  sleep 30
done
exit 1
