#!/usr/bin/env bash
# Create .venv and install llmtrain into it.
#   bash tools/setup.sh          # runtime only (enough for the quick start)
#   bash tools/setup.sh dev      # + test/lint tools (and the S3 test server: moto[server], s3fs)
#   bash tools/setup.sh s3       # + s3:// data and checkpoint mirrors (s3fs, boto3; docs/storage.md)
#   bash tools/setup.sh dev deepspeed megatron   # + optional engines (see docs/engines.md)
# Torch is installed first, pinned, so that the later `pip install -e .` never resolves a torch of its
# own: LLMTRAIN_TORCH (default "torch==2.13.0") is passed to pip as words. On the project's CPU machines
# pip takes that pin's CPU wheel from local disk; on a GPU node the same pin from PyPI is the CUDA build;
# elsewhere on a CPU-only box use LLMTRAIN_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu";
# LLMTRAIN_TORCH=skip keeps the torch already in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
TORCH_SPEC=${LLMTRAIN_TORCH:-torch==2.13.0}
if [ "$TORCH_SPEC" != skip ] && ! "$VPY" -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086  # word splitting intended: a spec plus pip options
  "$VPY" -m pip install -q $TORCH_SPEC
fi
extras=$(IFS=,; echo "$*")
"$VPY" -m pip install -q -e ".${extras:+[$extras]}"
echo "llmtrain installed in $(pwd)/.venv ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
