"""When to save (step and wall-clock cadence, agreed by all ranks) and what a run starts from.

Resume rules (checkpoint.resume / checkpoint.init_from), chosen so that a requeued job never loses work:
  1. the run folder holds a complete checkpoint and resume is auto or a path -> the newest one, full state;
  2. resume=<path> and the run has none of its own -> that checkpoint, full state (model, optimizer,
     step, data position, RNG): branching a run from another one's checkpoint;
  3. init_from=<path> and nothing above -> weights only (+ optimizer with init_load_optimizer), step 0;
  4. otherwise a fresh start. resume=none refuses a run folder that already holds checkpoints, because
     the new run's saves would be mixed with (and pruned against) the old ones.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.checkpoint.folder import CheckpointError, latest_checkpoint, resolve_checkpoint_path
from llmtrain.config.checkpoint import CheckpointConfig
from llmtrain.distributed.collectives import broadcast_int

# model fields that change parameter shapes or names (max_seq_len/init_std/rope_theta do not)
SHAPE_KEYS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "ffn_dim",
    "multiple_of",
    "ffn_dim_multiplier",
    "tie_embeddings",
)


class SaveSchedule:
    """every_steps and/or every_minutes. The clock is read on rank 0 and broadcast, so all ranks take
    the same decision at the same step even when their clocks or step times differ."""

    def __init__(self, every_steps: int, every_minutes: float) -> None:
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.last_save_time = time.monotonic()

    def due(self, step: int) -> bool:
        """Collective when every_minutes > 0 (one int broadcast per step)."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        if not self.every_minutes:
            return False
        return bool(broadcast_int(int(time.monotonic() - self.last_save_time >= 60 * self.every_minutes)))

    def saved(self) -> None:
        self.last_save_time = time.monotonic()


@dataclass
class ResumePlan:
    """What `Trainer.maybe_resume` loads: nothing, a full state, or weights for fine-tuning."""

    path: Path | None
    full_state: bool
    """True: model, optimizer, counters, data, RNG. False: model (+ optimizer if load_optimizer) only."""
    load_optimizer: bool
    reason: str


def plan_resume(ck: CheckpointConfig, folder: Path) -> ResumePlan:
    """Apply the resume rules of this module to the run's checkpoint folder."""
    own = latest_checkpoint(folder)
    mode = ck.resume
    if mode == "none":
        if own is not None:
            raise CheckpointError(
                f"checkpoint.resume=none but {folder} already holds checkpoints (newest {own.name}): use another "
                f"run.name, move that folder away, or leave checkpoint.resume=auto to continue it"
            )
    elif own is not None:
        return ResumePlan(own, True, True, f"resuming this run from {own}")
    elif mode != "auto":
        path = resolve_checkpoint_path(mode)
        return ResumePlan(path, True, True, f"checkpoint.resume: starting from {path}")
    if ck.init_from:
        path = resolve_checkpoint_path(ck.init_from)
        return ResumePlan(path, False, ck.init_load_optimizer, f"checkpoint.init_from: weights from {path}")
    return ResumePlan(None, False, False, "fresh start")


def check_model_matches(saved_config: dict[str, Any] | None, model_cfg: Any, path: Path) -> None:
    """Refuse a checkpoint of a differently shaped model with the differing keys named."""
    saved = (saved_config or {}).get("model")
    if not saved:
        return
    diff = {
        k: (saved.get(k), getattr(model_cfg, k))
        for k in SHAPE_KEYS
        if k in saved and saved.get(k) != getattr(model_cfg, k)
    }
    if diff:
        lines = ", ".join(f"model.{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path}: saved for another model shape ({lines})")
