"""When to save (step and wall-clock cadence, agreed by all ranks) and what a run starts from.

Resume rules (checkpoint.resume / checkpoint.init_from), chosen so that a requeued job never loses work:
  0. only intact checkpoints count: a damaged newest one is set aside (renamed, never deleted) and the
     newest intact one is used, with a warning naming the damaged one;
  1. resume=auto and the run folder holds a checkpoint -> the newest one, full state;
  2. resume=<path> -> that checkpoint, full state (model, optimizer, step, data position, RNG): branching
     from another run, or going back to an older step of this one. Every save of the branch records the
     path as its origin, so a requeued job of the same command continues from the branch's own newest
     checkpoint instead of going back again;
  3. init_from=<path> and nothing above -> weights only (+ optimizer with init_load_optimizer), step 0;
  4. otherwise a fresh start. resume=none refuses a run folder that already holds checkpoints, because
     the new run's saves would be mixed with (and pruned against) the old ones.
"""

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmtrain.checkpoint.dcp_io import verify_dcp
from llmtrain.checkpoint.folder import (
    ENGINE_DIR,
    CheckpointError,
    is_remote,
    list_checkpoints,
    resolve_checkpoint_path,
    set_aside,
)
from llmtrain.checkpoint.pin import InitPin, run_pin, verify
from llmtrain.checkpoint.state import TrainerState
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
    state: TrainerState | None = None
    """The checkpoint's trainer state, already read and checked (full-state resumes)."""
    origin: str | None = None
    """The explicit checkpoint.resume this run's lineage started from (recorded in its saves)."""
    notes: list[str] = field(default_factory=list)
    """Warnings for the user: damaged checkpoints set aside, superseded newer checkpoints."""
    pin: InitPin | None = None
    """checkpoint.init_from resolved once for this run (None without init_from)."""


def check_intact(path: Path) -> TrainerState:
    """What a resume reads, checked before anything is loaded: the manifest (every file present with its
    size), the trainer state, the DCP metadata. Checksums are left to tools/inspect_checkpoint.py:
    reading every byte of a large checkpoint on one rank would cost more than the resume itself."""
    state = TrainerState.read(path)
    if (path / ENGINE_DIR / ".metadata").is_file():
        verify_dcp(path / ENGINE_DIR)
    return state


def newest_intact(
    folder: Path, notes: list[str], dry: bool = False
) -> tuple[Path | None, TrainerState | None]:
    """The run's newest checkpoint that is intact. Damaged newer ones (a file missing or truncated, an
    unreadable state) are set aside under a new name, never deleted, with a note for the user (rank 0;
    `dry`: only noted, nothing renamed)."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return path, check_intact(path)
        except CheckpointError as e:
            if dry:
                notes.append(f"checkpoint {path} is damaged ({e}); the run will set it aside")
                continue
            moved = set_aside(path, str(e))
            notes.append(f"checkpoint {path} is damaged ({e}); set aside as {moved.name}")
    return None, None


def check_resume(ck: CheckpointConfig, folder: Path, model: Any) -> ResumePlan:
    """The launcher's read-only rehearsal of the resume, before it writes anything into the run folder:
    the same rules and errors as `plan_resume` (resume=none over checkpoints, a missing resume path, a
    changed init_from base, another model shape), nothing renamed or recorded. Remote (`s3://`) resume and
    init_from paths are left to the trainer, which downloads them first (checkpoint/mirror.py)."""
    if is_remote(ck.resume) or is_remote(ck.init_from):
        local_init = None if is_remote(ck.init_from) else ck.init_from
        ck = replace(ck, resume="auto" if is_remote(ck.resume) else ck.resume, init_from=local_init)
    plan = plan_resume(ck, folder, dry=True)
    if plan.state is not None and plan.path is not None:
        check_model_matches(plan.state.config, model, plan.path)
    return plan


def plan_resume(ck: CheckpointConfig, folder: Path, dry: bool = False) -> ResumePlan:
    """Apply the resume rules of this module to the run's checkpoint folder (rank 0: it may set damaged
    checkpoints aside; the trainer shares the plan with the other ranks), with checkpoint.init_from
    pinned (checkpoint/pin.py; the run folder is the checkpoint folder's parent)."""
    plan = _plan(ck, folder, dry)
    saved = plan.state.init_from if plan.state is not None else None
    plan.pin = run_pin(ck.init_from, folder.parent, saved)
    if plan.path is not None and not plan.full_state and plan.pin is not None:  # weights of the pinned base
        plan.path = verify(plan.pin)
    return plan


def _plan(ck: CheckpointConfig, folder: Path, dry: bool) -> ResumePlan:
    notes: list[str] = []
    own, own_state = newest_intact(folder, notes, dry)
    mode = ck.resume
    if mode == "none":
        if own is not None:
            raise CheckpointError(
                f"checkpoint.resume=none but {folder} already holds checkpoints (newest {own.name}): use another "
                f"run.name, move that folder away, or leave checkpoint.resume=auto to continue it"
            )
    elif mode != "auto":
        path = resolve_checkpoint_path(mode)
        origin = str(path.resolve())
        continues = own is not None and own_state is not None and own_state.resume_origin == origin
        if own is not None and (continues or own.resolve() == path.resolve()):  # a requeue of that branch
            return ResumePlan(own, True, True, f"resuming this run from {own}", own_state, origin, notes)
        if own is not None:
            notes.append(
                f"checkpoint.resume={mode}: starting from it; this run's newer {own.name} is superseded"
            )
        return ResumePlan(
            path, True, True, f"checkpoint.resume: starting from {path}", check_intact(path), origin, notes
        )
    elif own is not None:
        origin = own_state.resume_origin if own_state else None
        return ResumePlan(own, True, True, f"resuming this run from {own}", own_state, origin, notes)
    if ck.init_from:
        path = resolve_checkpoint_path(ck.init_from, key="checkpoint.init_from")
        reason = f"checkpoint.init_from: weights from {path}"
        return ResumePlan(path, False, ck.init_load_optimizer, reason, None, None, notes)
    return ResumePlan(None, False, False, "fresh start", None, None, notes)


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
