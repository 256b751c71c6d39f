"""Convert a checkpoint of the megatron engine into a native llmtrain checkpoint (weights only).

    python tools/convert_megatron.py runs/<name>/checkpoints/step_00001000 native_ckpt/
    python tools/convert_megatron.py runs/<name> native_ckpt/      # newest complete checkpoint

The megatron engine saves one tensors-only file per (tp, pp) coordinate; this gathers the TP shards,
undoes megatron's fused QKV / gate-up layouts and RoPE row order and writes the full weights under
the native names as a DCP checkpoint: train on with `parallel.backend=native|deepspeed` and
`checkpoint.init_from=native_ckpt/`, or export it with tools/export_hf.py. The other direction needs no
tool: the megatron engine loads a native checkpoint directly (any tp/pp). Optimizer state does not
carry over between engines. Needs neither megatron-core nor a process group.
"""

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.checkpoint import CheckpointError
from llmtrain.checkpoint.convert import write_weights_checkpoint
from llmtrain.checkpoint.layout import ENGINE_DIR, STATE_FILE, resolve_checkpoint_path
from llmtrain.checkpoint.manager import read_state
from llmtrain.models.llama import TransformerArgs
from llmtrain.parallel.backends.megatron_convert import engine_files_to_native

FILE_RE = re.compile(r"^megatron_tp(\d+)-of-(\d+)_pp(\d+)-of-(\d+)\.pt$")


def convert(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the native checkpoint `out` from the megatron-engine checkpoint `checkpoint`."""
    path = resolve_checkpoint_path(checkpoint)
    config = read_state(path).get("config") or {}
    model, parallel = config.get("model"), config.get("parallel") or {}
    if not model:
        raise CheckpointError(f"{path / STATE_FILE}: no model config recorded")
    files = {FILE_RE.match(f.name): f for f in (path / ENGINE_DIR).glob("megatron_*.pt")}
    shards = {
        (int(m[1]), int(m[3])): torch.load(f, map_location="cpu", weights_only=True)
        for m, f in files.items()
        if m
    }
    if not shards:
        raise CheckpointError(f"{path / ENGINE_DIR}: no megatron engine files (megatron_tp*_pp*.pt)")
    tp, pp = int(next(m for m in files if m)[2]), int(next(m for m in files if m)[4])
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in shards]
    if missing:
        raise CheckpointError(f"{path / ENGINE_DIR}: missing shards (tp, pp) {missing}")
    vp = int(parallel.get("pp_virtual_stages", 1)) if pp > 1 else 1
    fields = TransformerArgs.__dataclass_fields__
    args = TransformerArgs(**{k: v for k, v in model.items() if k in fields})
    weights = engine_files_to_native(shards, args, tp, pp, vp)
    return write_weights_checkpoint(out, weights, {"model": model}, source=str(path.resolve()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step_<N> folder of a megatron-engine run, or the run folder")
    ap.add_argument("out", help="new folder for the native checkpoint")
    a = ap.parse_args(argv)
    try:
        out = convert(a.checkpoint, a.out)
    except CheckpointError as e:
        print(f"convert_megatron: {e}", file=sys.stderr)
        return 2
    print(f"wrote native checkpoint {out} (use checkpoint.init_from={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
