#!/usr/bin/env bash
# The SLURM tests (tests/launch/test_slurm_cluster.py): Debian's slurm-wlm and munge. Installs only; the tests'
# fixture starts a two-node cluster on 127.0.0.1 itself (launch/local_cluster.sh) and stops it.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends slurm-wlm munge
