#!/usr/bin/env bash
# Launch IP-Adapter training on every host of a multi-host Cloud TPU VM slice at once.
#
#   train/launch_tpu_pod.sh TPU_NAME ZONE [key=value ...]
#   e.g. train/launch_tpu_pod.sh my-v4-32 us-central2-b total_steps=100000 data.cache=/mnt/shared/cache/plus
#
# Every host runs the same command; jax.distributed.initialize() (distributed.enabled in the recipe) finds the
# coordinator, so no addresses are passed. Assumes: this repository checked out at $REPO on every host (or on
# the shared mount), and the shared mount (NFS/Filestore, or a gcsfuse bucket) at /mnt/shared on every host.
# Override RECIPE, REPO, VENV or PROJECT in the environment.
set -euo pipefail

TPU_NAME=${1:?usage: launch_tpu_pod.sh TPU_NAME ZONE [key=value ...]}
ZONE=${2:?usage: launch_tpu_pod.sh TPU_NAME ZONE [key=value ...]}
shift 2
RECIPE=${RECIPE:-train/tpu_pod_sd15_plus.yaml}
REPO=${REPO:-\$HOME/ipadapter-jax}
VENV=${VENV:-\$HOME/venv}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

OVERRIDES=""
for kv in "$@"; do OVERRIDES+=" $(printf %q "$kv")"; done

# One-time setup per host (idempotent): a virtualenv with JAX for TPU and this package.
SETUP="test -x $VENV/bin/python || (python3 -m venv $VENV && $VENV/bin/pip install -q -U pip && \
  $VENV/bin/pip install -q 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && \
  $VENV/bin/pip install -q -e \"$REPO[data]\")"

# Logs per host; the run resumes from workdir if it was interrupted, so relaunching the same command continues.
RUN="cd $REPO && $VENV/bin/ipadapter-jax train --config $RECIPE $OVERRIDES \
  > /tmp/ipadapter-train-\$(hostname).log 2>&1"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="$SETUP && $RUN"
