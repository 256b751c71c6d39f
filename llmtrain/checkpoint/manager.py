"""Checkpoint manager: sharded model+optimizer through torch.distributed.checkpoint (DCP), plus
trainer state as JSON and per-rank RNG states, written atomically.

Layout (DESIGN.md "Checkpoints"):
  <run_dir>/checkpoints/step_<N>/        complete checkpoint (renamed into place, then COMPLETE marker)
      model_optim/  DCP shards + .metadata (loadable under another layout)
      trainer_state.json                 step, tokens, data state per rank, config, tracking run id
      rng/rank_<r>.pt                    RNG tensors (loaded with weights_only=True)
      COMPLETE                           written last; only marked folders count as checkpoints
  <run_dir>/checkpoints/step_<N>.tmp-*   in-progress save; ignored and cleaned up
"""

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from llmtrain.parallel.engine import Engine

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / COMPLETE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(folder: str | Path) -> Path | None:
    ckpts = list_checkpoints(folder)
    return ckpts[-1][1] if ckpts else None


def capture_rng() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Save/load/retention for one run folder. All ranks call save/load collectively."""

    def __init__(self, folder: str | Path, keep_last: int = 3, keep_every: int = 0) -> None:
        self.folder = Path(folder)
        self.keep_last, self.keep_every = keep_last, keep_every

    def save(self, step: int, engine: "Engine", state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Write checkpoint `step`. `state` (JSON) comes from rank 0; `rank_state` (JSON) is gathered
        from every rank into state['ranks']."""
        final = self.folder / f"step_{step:08d}"
        token = uuid.uuid4().hex[:8] if _rank() == 0 else ""
        if dist.is_initialized():
            box = [token]
            dist.broadcast_object_list(box, src=0)
            token = box[0]
        tmp = self.folder / f"step_{step:08d}.tmp-{token}"
        tmp.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save(tmp / "model_optim")
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(capture_rng(), tmp / "rng" / f"rank_{_rank():05d}.pt")
        ranks = [rank_state]
        if dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, rank_state)
        if _rank() == 0:
            full = dict(state, step=step, ranks=ranks, saved_at=time.time())
            (tmp / STATE_FILE).write_text(json.dumps(full))
        _barrier()
        if _rank() == 0:
            _fsync_tree(tmp)
            if final.exists():  # a stale incomplete folder of the same step (no marker) from a crash
                shutil.rmtree(final)
            os.replace(tmp, final)
            marker = final / COMPLETE
            marker.write_text(str(step))
            _fsync_tree(final)
            self._retain()
        _barrier()
        return final

    def _retain(self) -> None:
        ckpts = list_checkpoints(self.folder)
        keep = {s for s, _ in ckpts[-self.keep_last :]}
        if self.keep_every:
            keep |= {s for s, _ in ckpts if s % self.keep_every == 0}
        for step, path in ckpts[:-1]:  # never the newest
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for p in self.folder.glob("step_*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def load(self, path: str | Path, engine: "Engine", load_optimizer: bool = True) -> dict[str, Any]:
        """Load model (+ optimizer) in place; return the trainer state with this rank's RNG restored."""
        path = Path(path)
        state_file = path / STATE_FILE
        if not (path / COMPLETE).is_file() or not state_file.is_file():
            raise CheckpointError(f"{path}: not a complete llmtrain checkpoint (no {COMPLETE} or {STATE_FILE})")
        try:
            state = json.loads(state_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{state_file}: unreadable trainer state ({e})") from e
        try:
            engine.load(path / "model_optim", load_optimizer=load_optimizer)
        except Exception as e:
            raise CheckpointError(f"{path / 'model_optim'}: cannot load sharded model/optimizer ({e})") from e
        rng = path / "rng" / f"rank_{_rank():05d}.pt"
        if rng.is_file():
            restore_rng(torch.load(rng, weights_only=True))
        return state
