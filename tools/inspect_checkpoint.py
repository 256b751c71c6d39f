"""Inspect llmtrain checkpoints: list a run's checkpoints, or verify and summarize one.

    python tools/inspect_checkpoint.py runs/<name>                      # every complete checkpoint
    python tools/inspect_checkpoint.py runs/<name>/checkpoints/step_00000100 [--tensors]

Verification goes further than a load: manifest sizes and per-file checksums, DCP metadata through an
allow-list, byte ranges of every item; nothing is unpickled freely. Exit code 2 when the checkpoint is unusable.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.checkpoint import CheckpointError, TrainerState, list_checkpoints
from llmtrain.checkpoint.dcp_io import tensor_shapes, verify_dcp
from llmtrain.checkpoint.folder import COMPLETE, DAMAGED_MARK, ENGINE_DIR, TMP_MARK, verify_manifest


def _size(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6


def list_run(folder: Path) -> int:
    """Every checkpoint of a run with its state: intact (manifest sizes and checksums verified),
    damaged (with the reason; a resume sets it aside and uses the newest intact one), incomplete, or set
    aside earlier. Returns 2 when any listed checkpoint is damaged."""
    ck = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    rows = list_checkpoints(ck)
    damaged = {}
    for _, p in rows:
        try:
            verify_manifest(p, checksums=True)
        except CheckpointError as e:
            damaged[p] = str(e)
    print(
        f"{len(rows)} complete checkpoint(s) in {ck}"
        + (f", {len(damaged)} of them DAMAGED" if damaged else "")
    )
    for step, p in rows:
        mtime = time.ctime((p / COMPLETE).stat().st_mtime)
        what = f"DAMAGED: {damaged[p]}" if p in damaged else "ok"
        print(f"  step {step:>9}  {_size(p):>10.1f} MB  {mtime}  {p.name}  {what}")
    for p in sorted(ck.glob("step_*")):
        if DAMAGED_MARK in p.name:
            print(f"  set aside as damaged (kept for inspection): {p.name}")
        elif TMP_MARK in p.name or not (p / COMPLETE).exists():
            print(f"  incomplete (ignored, removed at the next start): {p.name}")
    return 2 if damaged else 0


def show(path: Path, tensors: bool) -> None:
    verify_manifest(path, checksums=True)
    state = TrainerState.read(path).state_dict()
    shapes = {}
    if (path / ENGINE_DIR / ".metadata").is_file():
        verify_dcp(path / ENGINE_DIR)
        shapes = tensor_shapes(path / ENGINE_DIR)
    print(f"{path}: OK ({_size(path):.1f} MB)")
    for key in (
        "step",
        "tokens_seen",
        "world_size",
        "layout",
        "engine",
        "mlflow_run_id",
        "run_dir",
        "source",
    ):
        if key in state:
            print(f"  {key}: {state[key]}")
    if "saved_at" in state:
        print(f"  saved_at: {time.ctime(state['saved_at'])}")
    model = (state.get("config") or {}).get("model")
    if model:
        print("  model: " + " ".join(f"{k}={v}" for k, v in model.items()))
    if shapes:
        print(f"  model tensors: {len(shapes)}, parameters: {sum(s.numel() for s, _ in shapes.values()):,}")
    if tensors:
        for name, (shape, dtype) in sorted(shapes.items()):
            print(f"    {name:60} {tuple(shape)} {str(dtype).removeprefix('torch.')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a run folder, its checkpoints/ folder, or one step_<N> folder")
    ap.add_argument("--tensors", action="store_true", help="list every model tensor with its shape")
    args = ap.parse_args(argv)
    path = Path(args.path)
    try:
        if (path / COMPLETE).exists() or path.name.startswith("step_"):
            show(path, args.tensors)
        else:
            return list_run(path)
    except CheckpointError as e:
        print(f"inspect_checkpoint: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
