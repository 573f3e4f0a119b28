#!/usr/bin/env bash
# The GPU acceptance run in one command, on a lent GPU machine: bench/gpu_check.py does the work (see it).
#
#   bench/gpu_check.sh [--only pytest,loss] [--budget-s 470] [--out DIR]     # from any folder
#
# Needs the wheels of bench/gpu_wheels.txt in .whl/ (bench/gpu_wheels.sh, run where the index is reachable).
# Without CUDA it stops at once with one line (exit 2); else exit 1 if any row of its table failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
