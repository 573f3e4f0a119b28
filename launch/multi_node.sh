#!/usr/bin/env bash
# Train on several machines: run this same command once on every node (SLURM: launch/slurm.sbatch does).
#
#   launch/multi_node.sh --endpoint node001:29500 --nnodes 4 --max-restarts 3 -- --config sop data.root=/data/sop
#
# Options (before `--`; everything after `--` goes to `python -m trainer`):
#   --endpoint HOST:PORT   c10d rendezvous; HOST is the first node, which serves it (required)
#   --nnodes N | MIN:MAX   number of nodes (required); MIN:MAX lets the job go on with fewer nodes
#   --max-restarts R       restarts of the whole worker group after a failure or membership change
#                          (default 3); each restart resumes from the run's latest checkpoint
#   --nproc-per-node P     processes per node (default: the number of visible GPUs, or 1 without CUDA)
#   --rdzv-id ID           job id, the same on every node (default: $SLURM_JOB_ID, else "proxygml")
#   --join-timeout S       seconds to wait for all nodes before giving up with an explanation (default 900)
#                          Node ranks are assigned by the rendezvous (c10d ignores --node-rank).
# The NCCL environment variables people trip over are in the README section "Launching on clusters".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit "${1:-0}"; }
die() { echo "multi_node.sh: $*" >&2; exit 2; }

endpoint="" nnodes="" max_restarts=3 nproc="" rdzv_id="${SLURM_JOB_ID:-proxygml}" join_timeout=900
while [[ $# -gt 0 ]]; do
  case "$1" in
    --endpoint) endpoint="${2:?--endpoint needs HOST:PORT}"; shift 2 ;;
    --nnodes) nnodes="${2:?--nnodes needs a number}"; shift 2 ;;
    --max-restarts) max_restarts="${2:?--max-restarts needs a number}"; shift 2 ;;
    --nproc-per-node) nproc="${2:?--nproc-per-node needs a number}"; shift 2 ;;
    --rdzv-id) rdzv_id="${2:?--rdzv-id needs a value}"; shift 2 ;;
    --join-timeout) join_timeout="${2:?--join-timeout needs seconds}"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (trainer arguments go after --; see --help)" ;;
  esac
done
[[ -n "$endpoint" ]] || die "--endpoint HOST:PORT is required (the first node's address and a free port)"
[[ "$endpoint" == *:* ]] || die "--endpoint $endpoint: give HOST:PORT"
[[ "$nnodes" =~ ^[0-9]+(:[0-9]+)?$ ]] || die "--nnodes: give N or MIN:MAX, got '${nnodes}'"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts: give a number >= 0, got '$max_restarts'"
[[ "$join_timeout" =~ ^[0-9]+$ ]] || die "--join-timeout: give seconds, got '$join_timeout'"
if [[ -z "$nproc" ]]; then
  nproc="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi

exec "$PYTHON" -m launch.torchrun \
  --nnodes "$nnodes" \
  --nproc-per-node "$nproc" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$endpoint" \
  --rdzv-id "$rdzv_id" \
  --join-timeout "$join_timeout" \
  --max-restarts "$max_restarts" \
  -m trainer "$@"
