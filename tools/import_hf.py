"""Import a Hugging Face Llama, Mixtral or Qwen3-MoE folder (safetensors + config.json) as an
llmtrain checkpoint.

    python tools/import_hf.py path/to/hf_llama ckpt/llama-init
    llmtrain checkpoint.init_from=ckpt/llama-init model.dim=... (the printed model.* overrides)

The result holds the weights only (step 0); `checkpoint.init_from` loads them into a new run for
continued pretraining or fine-tuning. Only .safetensors weights are read (never pickle).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.checkpoint import CheckpointError
from llmtrain.checkpoint.convert import import_hf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_folder")
    ap.add_argument("out", help="new checkpoint folder (must not exist)")
    args = ap.parse_args(argv)
    try:
        model = import_hf(args.hf_folder, args.out)
    except CheckpointError as e:
        print(f"import_hf: {e}", file=sys.stderr)
        return 2
    overrides = " ".join(f"model.{k}={'null' if v is None else v}" for k, v in model.items())
    print(f"wrote {args.out}\nuse it with: checkpoint.init_from={args.out} {overrides}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
