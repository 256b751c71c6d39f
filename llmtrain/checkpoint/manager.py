"""Checkpoint manager: atomic sharded saves (optionally in the background), retention, safe loading.

A save, on every rank at the same step (see layout.py for the folder layout):
  1. the engine writes its (sharded) state into a per-rank *staging* folder: `<tmp>/.rank_<r>` on the
     checkpoint disk, or for `async_save` a RAM disk (/dev/shm) so the step is blocked only for the
     device->host copy and its serialization to memory;
  2. each rank moves/copies its own files into the shared temporary folder `step_<N>.tmp-<id>` and
     fsyncs them (each writer flushes its own data: correct on network filesystems too);
  3. the ranks agree that every rank succeeded; rank 0 renames the folder to `step_<N>`, writes the
     COMPLETE manifest last, then applies retention.
A SIGKILL anywhere before the manifest leaves a folder that is never listed; a failed write (full disk)
removes the temporary folder and raises CheckpointError on every rank; the previous checkpoint stays.
For `async_save`, steps 2-3 run in a background thread that talks over its own gloo group, and the next
save (or `wait()` at the end of the run) waits for it.
"""

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from llmtrain.checkpoint.dcp_io import single_process_dcp, verify_dcp
from llmtrain.checkpoint.folder import (
    COMPLETE,
    ENGINE_DIR,
    RNG_DIR,
    STEP_RE,
    TMP_MARK,
    CheckpointError,
    fault_point,
    file_checksum,
    fsync_path,
    list_checkpoints,
    resolve_checkpoint_path,
    staged_by_rank0,
    step_dir,
    write_manifest,
)
from llmtrain.checkpoint.formats import engine_of, to_native
from llmtrain.checkpoint.policy import check_model_matches
from llmtrain.checkpoint.rng import restore_rng, save_torch_rng
from llmtrain.checkpoint.state import RankState, TrainerState
from llmtrain.distributed.collectives import broadcast_object, gather_objects


class Stateful(Protocol):
    """What the manager needs of an engine (llmtrain.parallel.engine.Engine implements it): defined here
    so that checkpoint/ does not import the engines it serves."""

    kind: str

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path, *, load_optimizer: bool = True) -> None: ...

    def snapshot(self) -> Any: ...


log = logging.getLogger("llmtrain")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class SaveResult:
    """What a save did: where the checkpoint goes, how long the training loop was blocked."""

    step: int
    path: Path
    blocked_s: float
    done: Future


def retained_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Steps to keep: the newest `keep_last`, every multiple of `keep_every`, and always the newest."""
    steps = sorted(steps)
    keep = set(steps[-max(keep_last, 1) :])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


class CheckpointManager:
    """Save/load/retention for one run's checkpoint folder. Every rank calls save/load together."""

    def __init__(
        self,
        folder: str | Path,
        keep_last: int = 3,
        keep_every: int = 0,
        async_save: bool = False,
        staging_dir: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self._pending: Future | None = None
        self._group = None
        self.deleted: list[Path] = []  # what the last save's retention removed (rank 0; for tracking)
        if async_save:
            root = Path(staging_dir or ("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()))
            run_id = hashlib.sha1(str(self.folder.resolve()).encode()).hexdigest()[:12]
            self._staging_root = root / f"llmtrain-{run_id}"
            shutil.rmtree(self._staging_root / f"rank_{_rank():05d}", ignore_errors=True)  # a killed save's
            if dist.is_initialized():  # the background thread must not share the training group
                self._group = dist.new_group(backend="gloo")

    # -- save ---------------------------------------------------------------------------------------
    def save(self, step: int, engine: Stateful, state: TrainerState, rank_state: RankState) -> SaveResult:
        """Collective. `state` from rank 0 plus every rank's `rank_state` become trainer_state.json.
        Returns once this rank may continue training (async: after staging)."""
        t0 = time.perf_counter()
        self.wait()
        rank, tmp = _rank(), self._agree_tmp_folder(step)
        error, writer = None, None
        if self.async_save:  # engines that can: copy state to host memory now, serialize it later
            try:
                writer = engine.snapshot()
            except Exception as e:
                error = _describe(e, rank)
        # no snapshot support: async saves stage through engine.save into RAM (/dev/shm) instead
        in_ram = self.async_save and writer is None
        stage = (self._staging_root / f"rank_{rank:05d}") if in_ram else tmp / f".rank_{rank:05d}"
        try:
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
            fault_point("begin", step, rank)
            if writer is None and error is None:
                with single_process_dcp():
                    engine.save(stage / ENGINE_DIR)
            save_torch_rng(stage / RNG_DIR / f"rank_{rank:05d}.pt")
        except (Exception, CheckpointException) as e:  # DCP re-raises a failed write on every rank
            error = error or _describe(e, rank)
        ranks = self._gather(rank_state, None)
        if rank == 0 and error is None:
            full = dataclasses.replace(state, step=step, ranks=ranks, saved_at=time.time())
            try:
                full.write(stage)
            except OSError as e:
                error = f"rank 0: {e}"
        fault_point("staged", step, rank)
        blocked = time.perf_counter() - t0
        if not self.async_save:
            self._commit(step, tmp, stage, error, move=True, group=None)
            done: Future = Future()
            done.set_result(step_dir(self.folder, step))
            return SaveResult(step, step_dir(self.folder, step), blocked, done)
        done = Future()
        thread = threading.Thread(
            target=self._background,
            args=(done, step, tmp, stage, error, writer),
            name=f"ckpt-save-{step}",
            daemon=True,
        )
        thread.start()
        self._pending = done
        return SaveResult(step, step_dir(self.folder, step), blocked, done)

    def wait(self) -> Path | None:
        """Block until the in-flight background save (if any) is complete; re-raise its error."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def _background(
        self, done: Future, step: int, tmp: Path, stage: Path, error: str | None, writer: Any
    ) -> None:
        try:
            if writer is not None and error is None:  # serialize the host snapshot straight to disk
                try:  # (no warnings filter here: catch_warnings is not thread-safe)
                    writer(stage / ENGINE_DIR, self._group)
                except (Exception, CheckpointException) as e:
                    error = _describe(e, _rank())
            self._commit(step, tmp, stage, error, move=writer is not None, group=self._group)
            done.set_result(step_dir(self.folder, step))
        except BaseException as e:
            done.set_exception(e)

    def _agree_tmp_folder(self, step: int) -> Path:
        token = broadcast_object(uuid.uuid4().hex[:8] if _rank() == 0 else "")
        tmp = self.folder / f"step_{step:08d}{TMP_MARK}{token}"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def _gather(self, obj: Any, group: Any) -> list[Any]:
        return gather_objects(obj, group)

    def _commit(self, step: int, tmp: Path, stage: Path, error: str | None, move: bool, group: Any) -> None:
        """Per rank: bring own files into tmp and fsync them; then rank 0 publishes atomically."""
        rank = _rank()
        sums: dict[str, str] = {}
        if error is None:
            try:
                sums = {str(f.relative_to(tmp)): file_checksum(f) for f in _transfer(stage, tmp, move)}
                fault_point("written", step, rank)
            except OSError as e:
                error = f"rank {rank}: {e}"
        shutil.rmtree(stage, ignore_errors=True)
        gathered = self._gather((error, sums), group)
        errors = [e for e, _ in gathered if e]
        if not errors and rank == 0:
            try:
                self._publish(step, tmp, {k: v for _, part in gathered for k, v in part.items()})
            except OSError as e:
                errors = [f"rank 0: {e}"]
        if dist.is_initialized():  # everyone learns whether rank 0 published
            errors = [e for e in self._gather(errors[0] if errors else None, group) if e]
        if errors:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint step {step} into {self.folder} failed, the previous checkpoint "
                f"is kept: {'; '.join(dict.fromkeys(errors))}"
            )

    def _publish(self, step: int, tmp: Path, checksums: dict[str, str]) -> None:
        final = step_dir(self.folder, step)
        fsync_path(tmp)
        for sub in (tmp / ENGINE_DIR, tmp / RNG_DIR):
            if sub.is_dir():
                fsync_path(sub)
        fault_point("renaming", step, 0)
        if final.exists():  # same step again (an incomplete leftover, or a re-run of that step): replace
            trash = final.with_name(final.name + TMP_MARK + "old")
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        fsync_path(self.folder)
        fault_point("renamed", step, 0)
        write_manifest(final, step, checksums)
        fault_point("complete", step, 0)
        self.deleted = self.apply_retention()

    # -- retention ----------------------------------------------------------------------------------
    def apply_retention(self) -> list[Path]:
        """Delete complete checkpoints outside keep-last/keep-every (never the newest) and leftovers
        of killed saves. Rank 0 only; returns what was deleted."""
        ckpts = list_checkpoints(self.folder)
        keep = retained_steps([s for s, _ in ckpts], self.keep_last, self.keep_every)
        deleted = [p for s, p in ckpts if s not in keep]
        for p in deleted:
            # unmark first: a deletion killed half-way leaves an unlisted folder, not a broken checkpoint
            (p / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)
        deleted += self.clean_stale()
        return deleted

    def clean_stale(self) -> list[Path]:
        """Remove temporary folders of saves that never completed (rank 0, no save in flight): a
        `step_<N>.tmp-*` folder, or a `step_<N>` without its manifest. Folders set aside as damaged
        (`step_<N>.damaged-*`) are kept for a person to look at."""
        if not self.folder.is_dir():
            return []
        stale = [
            p
            for p in self.folder.iterdir()
            if p.is_dir() and (TMP_MARK in p.name or (STEP_RE.match(p.name) and not (p / COMPLETE).exists()))
        ]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return stale

    # -- load ---------------------------------------------------------------------------------------
    def load(
        self,
        path: str | Path,
        engine: Stateful,
        load_optimizer: bool = True,
        model: Any = None,
        state: TrainerState | None = None,
    ) -> TrainerState:
        """Verify, then load model (+ optimizer) in place; returns the checkpoint's trainer state.
        `model` (the run's ModelConfig): refuse a checkpoint of another model shape, naming the keys.
        `state`: the trainer state a caller already read and checked (read here otherwise)."""
        path = resolve_checkpoint_path(path)
        state = state or TrainerState.read(path)
        if model is not None:
            check_model_matches(state.config, model, path)
        written_by, running = engine_of(path), engine.kind
        if (path / ENGINE_DIR / ".metadata").is_file():  # native loads decode non-tensor items safely
            verify_dcp(path / ENGINE_DIR, items=not written_by == running == "native")
        if written_by not in ("native", running):
            self._load_other_engine(path, written_by, running, engine, load_optimizer)
            return state
        try:
            with single_process_dcp():
                engine.load(path / ENGINE_DIR, load_optimizer=load_optimizer)
        except Exception as e:
            raise CheckpointError(
                f"{path / ENGINE_DIR}: cannot load model/optimizer state ({type(e).__name__}: {e})"
            ) from e
        return state

    def _load_other_engine(
        self, path: Path, written_by: str, running: str, engine: Stateful, load_optimizer: bool
    ) -> None:
        """Weights of another engine's checkpoint: rank 0 converts them to a native checkpoint beside
        this run's checkpoints (the source stays untouched), every rank loads it, rank 0 removes it.
        Optimizer state does not carry over between engines, so a full resume is refused."""
        if load_optimizer:
            raise CheckpointError(
                f"{path}: written by the {written_by} engine, this run has parallel.backend={running}; its "
                f"optimizer state cannot carry over. Resume with parallel.backend={written_by}, or start "
                f"from its weights only with checkpoint.init_from={path}"
            )
        staging = self.folder.parent / f".from-{written_by}-{path.name}"
        what = f"{path}: converting the {written_by} checkpoint to native weights"
        with staged_by_rank0(staging, lambda out: to_native(path, out), what) as native:
            engine.load(native / ENGINE_DIR, load_optimizer=False)
        log.info("loaded the weights of %s (%s engine) into the %s engine", path, written_by, running)

    def restore_rng(self, path: Path, state: TrainerState) -> None:
        """Put this rank's generators back where they were at the save of checkpoint `path` (exact
        resume); a rank beyond the saved world keeps its seeded generators."""
        rank = _rank()
        torch_file = Path(path) / RNG_DIR / f"rank_{rank:05d}.pt"
        restore_rng(torch_file, state.ranks[rank].rng if rank < len(state.ranks) else None)


def _transfer(stage: Path, tmp: Path, move: bool) -> list[Path]:
    """Move (same disk) or copy (from RAM) every staged file into tmp, then fsync it there; returns them."""
    out = []
    for src in sorted(p for p in stage.rglob("*") if p.is_file()):
        dst = tmp / src.relative_to(stage)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            raise OSError(f"{dst} was written by two ranks (engine file names must be unique per rank)")
        if move:
            os.replace(src, dst)
        else:
            shutil.copyfile(src, dst)
        fsync_path(dst)
        out.append(dst)
    return out


def _describe(e: BaseException, rank: int) -> str:
    """One line for an error; DCP's CheckpointException carries the failing ranks' errors (each rank
    receives all of them, so messages are deduplicated when joined)."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {type(x).__name__}: {x}" for r, (x, *_) in sorted(e.failures.items()))
    return f"rank {rank}: {type(e).__name__}: {e}"
