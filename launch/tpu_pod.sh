#!/usr/bin/env bash
# Train on every worker of a Cloud TPU pod slice (docs/multihost.md).
#
#   launch/tpu_pod.sh TPU_NAME ZONE OUT_DIR [seqmix train flags...]
#
# Copies this checkout to every worker, installs it with the tpu extra in a venv there, and starts the
# same `seqmix train` on all workers at once; JAX joins them (`--distributed always`: on a GCE TPU VM it
# reads the slice from the TPU metadata server). OUT_DIR must be a directory every worker sees (a
# Filestore/NFS mount or a gcsfuse-mounted bucket): Orbax writes each worker's shards there and
# `--resume` reads them back. Example:
#   launch/tpu_pod.sh my-v5e-32 us-west4-a /mnt/shared/runs/lm --mesh data=-1 --steps 5000
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
name=$1 zone=$2 out=$3
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
flags=$(printf ' %q' "$@")
tar -C "$here" --exclude=.git --exclude='.venv*' --exclude=runs -czf /tmp/seqmix-src.tgz .
gcloud compute tpus tpu-vm scp /tmp/seqmix-src.tgz "$name":/tmp/seqmix-src.tgz --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e; mkdir -p ~/seqmix && tar -C ~/seqmix -xzf /tmp/seqmix-src.tgz && cd ~/seqmix
  [ -x .venv/bin/seqmix ] || (python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]')
  .venv/bin/seqmix train --distributed always --out $(printf '%q' "$out")$flags"
