#!/usr/bin/env bash
# Train on one machine: one process per GPU (or NPROC_PER_NODE processes on the CPU).
#
#   launch/single_node.sh --config cub200 data.root=/data/cub200
#   NPROC_PER_NODE=2 launch/single_node.sh --config demo       # two CPU processes (gloo)
#
# Every argument goes to `python -m trainer`. Environment:
#   NPROC_PER_NODE  processes on this node (default: the number of visible GPUs, or 1 without CUDA)
#   MAX_RESTARTS    times torchrun restarts all workers after one fails (default 0); the trainer resumes
#                   from the run's latest checkpoint, so raise it to survive a crashed worker.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi

exec "$PYTHON" -m launch.torchrun \
  --standalone \
  --nproc-per-node "$NPROC_PER_NODE" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m trainer "$@"
