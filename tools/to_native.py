"""Convert a checkpoint of the DeepSpeed or megatron engine into a native llmtrain checkpoint (weights only).

    python tools/to_native.py runs/<name>/checkpoints/step_00001000 native_ckpt/
    python tools/to_native.py runs/<name> native_ckpt/      # newest complete checkpoint

megatron: gathers the TP shards of the one-file-per-(tp, pp) checkpoint and undoes megatron's fused
QKV / gate-up layouts and RoPE row order (needs neither megatron-core nor a process group).
DeepSpeed: the fp32 master weights of the ZeRO 1-3 shards (any world size; needs deepspeed).
The result holds the full weights under the native names, plus the run's model and data config:
train on with any engine and `checkpoint.init_from=native_ckpt/`, or export it with
tools/export_hf.py (which also does this step itself). The other direction needs no tool: every
engine loads a native checkpoint directly (any layout). Optimizer state does not carry over.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.checkpoint import CheckpointError
from llmtrain.checkpoint.formats import to_native


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step_<N> folder of a DeepSpeed or megatron run, or the run folder")
    ap.add_argument("out", help="new folder for the native checkpoint")
    a = ap.parse_args(argv)
    try:
        out = to_native(a.checkpoint, a.out)
    except CheckpointError as e:
        print(f"to_native: {e}", file=sys.stderr)
        return 2
    print(f"wrote native checkpoint {out} (use checkpoint.init_from={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
