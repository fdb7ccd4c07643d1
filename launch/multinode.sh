#!/usr/bin/env bash
# Start one process of a multi-process run by hand (no scheduler): run it on every host with its own
# PROCESS_ID (docs/multihost.md).
#
#   launch/multinode.sh COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID OUT_DIR [seqmix train flags...]
#
# COORDINATOR is process 0's host and a free port; OUT_DIR is a directory every process sees. On one
# machine with CPUs only (what the tests do), add XLA_FLAGS=--xla_force_host_platform_device_count=4
# to the environment to give each process 4 devices.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
coordinator=$1 num=$2 id=$3 out=$4
shift 4
here=$(cd "$(dirname "$0")/.." && pwd)
exec "$here/.venv/bin/seqmix" train --coordinator "$coordinator" --num-processes "$num" --process-id "$id" \
  --out "$out" "$@"
