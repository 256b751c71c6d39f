#!/usr/bin/env bash
# Bring up a single-node SLURM cluster (with slurmdbd, so job states are real) for tests/launch, then
# a separate two-node cluster (n1, n2; tools/ci/slurm-2node-up.sh) for the multi-node tests.
# The tests find them through /tmp/slurm-local/slurm.conf and /tmp/slurm-2node/slurm.conf; nothing is exported from here. When this
# fails (not root, no apt), the SLURM tests skip and say why. Every step is time-bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then echo "slurm: not root, skipping the local cluster (SLURM tests will skip)"; exit 1; fi
if ! command -v apt-get >/dev/null; then echo "slurm: no apt-get, skipping (SLURM tests will skip)"; exit 1; fi
if [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/slurmdbd ]; then
  timeout 180 apt-get update -q >/dev/null || echo "slurm: apt-get update failed or timed out; trying the install anyway"
fi
WITH_DBD=1 BASE=/tmp/slurm-local timeout 300 bash tools/ci/slurm-local-up.sh
BASE=/tmp/slurm-2node timeout 200 bash tools/ci/slurm-2node-up.sh ||
  echo "slurm: the two-node cluster did not start (tests/launch/test_slurm_multinode.py will skip)"
