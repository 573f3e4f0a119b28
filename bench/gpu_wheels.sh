#!/usr/bin/env bash
# Fill .whl/ with exactly the wheels of bench/gpu_wheels.txt, for the lent GPU machine (Python 3.12, x86-64).
#
#   PYTHON=.venv/bin/python bench/gpu_wheels.sh        # then: python bench/gpu_check.py --check-wheels-only
#
# Run it here (a machine that reaches the package index), never on the GPU machine (it reaches nothing).
# Binary wheels come from `pip download --no-deps --only-binary=:all:` for CPython 3.12 manylinux x86-64;
# deepspeed, an sdist on the index, is built with `pip wheel` (pure Python; its ops compile on first use), by
# $PYTHON, which must import torch (its setup.py does). DS_ACCELERATOR=cuda records the CUDA accelerator in it.
# .whl/ is emptied first, so it never holds two versions of one package; it is git-ignored and travels to the
# GPU machine as a carried path (`carry: [".whl"]`), about 40 MiB of the 64 MiB a call may carry.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DEST="${DEST:-$ROOT/.whl}"
MANIFEST="$ROOT/bench/gpu_wheels.txt"

mapfile -t PINS < <(grep -v '^[[:space:]]*#' "$MANIFEST" | sed 's/[[:space:]]*#.*//' | grep -v '^[[:space:]]*$')
BINARY=()
DEEPSPEED=""
for pin in "${PINS[@]}"; do
  if [[ "$pin" == deepspeed==* ]]; then DEEPSPEED="$pin"; else BINARY+=("$pin"); fi
done

rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" --dest "$DEST" "${BINARY[@]}"
if [[ -n "$DEEPSPEED" ]]; then
  DS_ACCELERATOR=cuda DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --no-cache-dir \
    --wheel-dir "$DEST" "$DEEPSPEED"
fi
echo "gpu_wheels: $(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
