"""Merge a LoRA run's adapters into its base weights, writing a plain (weights-only) checkpoint.

    python tools/merge_lora.py runs/<lora-run> merged/
    python tools/export_hf.py merged/ hf_out/          # then export as usual

The base is read from the run's checkpoint.init_from; the output loads with checkpoint.init_from,
tools/evaluate.py and tools/generate.py like any checkpoint.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a LoRA step_<N> folder, checkpoints/ folder or run folder")
    ap.add_argument("out", help="new output folder")
    args = ap.parse_args(argv)
    from llmtrain.checkpoint.lora_merge import merge_lora_checkpoint

    try:
        out = merge_lora_checkpoint(args.checkpoint, args.out)
    except CheckpointError as e:
        print(f"merge_lora: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
