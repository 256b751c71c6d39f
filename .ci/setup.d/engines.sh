#!/usr/bin/env bash
# Optional training engines for tests/engines (docs/engines.md): DeepSpeed and megatron-core, the same
# versions as the `deepspeed`/`megatron` extras, and torchao for parallel.fp8 (tests/parallel/test_fp8.py,
# the `fp8` extra). torch is named in the same pip command so that pip can
# never swap the CPU wheel for a CUDA build. DS_BUILD_OPS=0: DeepSpeed compiles no C++/CUDA ops at install
# (the engine avoids the ops it would JIT-build at run time). Idempotent; bounded by a timeout.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
want_ds=0.19.8 want_mc=0.16.1 want_ao=0.18.0
have=$("$PY" - <<'PY' 2>/dev/null || true
from importlib.metadata import version
try:
    print(version("deepspeed"), version("megatron-core"), version("torchao"))
except Exception:
    print("")
PY
)
if [ "$have" = "$want_ds $want_mc $want_ao" ]; then
  echo "engines: already installed (deepspeed $want_ds, megatron-core $want_mc, torchao $want_ao)"
  exit 0
fi
torch_spec="torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
DS_BUILD_OPS=0 timeout 600 .venv/bin/pip install -q "$torch_spec" "deepspeed==$want_ds" "megatron-core==$want_mc" \
  "torchao==$want_ao"
echo "engines: installed deepspeed $want_ds, megatron-core $want_mc, torchao $want_ao (kept $torch_spec)"
