#!/usr/bin/env bash
# Create .venv and install llmtrain into it.
#   bash tools/setup.sh          # runtime only (enough for the quick start)
#   bash tools/setup.sh dev      # + test/lint tools
#   bash tools/setup.sh dev deepspeed megatron   # + optional engines (see docs/engines.md)
# Torch: on CPU machines we install the CPU wheel first (torch==2.13.0, which these machines keep on
# local disk) so that pip never resolves the multi-GB CUDA build. On a GPU cluster set
# LLMTRAIN_TORCH="torch==<version>" (or "skip" to keep an existing install) before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
TORCH_SPEC=${LLMTRAIN_TORCH:-torch==2.13.0}
if [ "$TORCH_SPEC" != skip ] && ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "$TORCH_SPEC"
fi
extras=$(IFS=,; echo "$*")
"$VPY" -m pip install -q -e ".${extras:+[$extras]}"
echo "llmtrain installed in $(pwd)/.venv ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
