"""The checkpoint folder: its on-disk layout, the completion manifest, and durable-write helpers.

    <run_dir>/checkpoints/step_<N:08d>/      complete checkpoint (renamed into place, then COMPLETE)
        model_optim/                         engine state (DCP shards + .metadata for the native engine)
        trainer_state.json                   step, tokens, LR position, per-rank data/RNG state, config, run id
        rng/rank_<r>.pt                      torch RNG tensors of rank r (loaded with weights_only=True)
        COMPLETE                             JSON manifest {step, files: {relative path: size}}; written last
    <run_dir>/checkpoints/step_<N>.tmp-<id>  a save in progress (or killed): never listed, cleaned up

A folder counts as a checkpoint only when its manifest exists and parses; loading re-checks every
listed file's size, so a truncated file is reported by name instead of failing deep inside torch.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from llmtrain.config.errors import ConfigError

FORMAT = "llmtrain-checkpoint/1"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
ENGINE_DIR = "model_optim"
RNG_DIR = "rng"
STEP_RE = re.compile(r"^step_(\d+)$")
TMP_MARK = ".tmp-"
FAULT_ENV = "LLMTRAIN_CKPT_FAULT"
"""Test hook: `<kill|term>:<phase>:<step>[:<rank>]` sends SIGKILL/SIGTERM to this rank at that phase."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or written; the message names the file or folder."""


def is_remote(path: object) -> bool:
    """A checkpoint path naming object storage or another fsspec store (`s3://...`): downloaded by
    checkpoint/mirror.py before the resume rules see it."""
    return "://" in str(path or "")


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder` (those with a COMPLETE manifest), oldest first."""
    folder = Path(folder)
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = STEP_RE.match(p.name)
            if m and (p / COMPLETE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """Newest complete checkpoint in `folder`, or None."""
    ckpts = list_checkpoints(folder)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint_path(path: str | Path, key: str | None = None) -> Path:
    """A checkpoint folder as given, or the newest complete one inside a checkpoints/ or run folder.
    With `key` (the config key that named the path) the error is a ConfigError naming it."""
    if key is not None:
        try:
            return resolve_checkpoint_path(path)
        except CheckpointError as e:
            raise ConfigError(f"{key}: {e}") from e
    path = Path(path)
    if (path / COMPLETE).is_file() or STEP_RE.match(path.name):
        return path
    for folder in (path, path / "checkpoints"):
        newest = latest_checkpoint(folder)
        if newest is not None:
            return newest
    raise CheckpointError(
        f"{path}: no complete llmtrain checkpoint here (expected a step_<N> folder with a "
        f"{COMPLETE} file, or a run/checkpoints folder holding one)"
    )


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_sizes(root: Path) -> dict[str, int]:
    """{relative path: size} of every file under root (the manifest content)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def file_checksum(path: Path, chunk: int = 1 << 22) -> str:
    """CRC-32 of a file's bytes (`crc32:<hex>`): catches bit rot and partial overwrites cheaply; each rank
    computes it for the files it wrote, so the cost follows the local shard."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"crc32:{crc:08x}"


def write_manifest(folder: Path, step: int, checksums: dict[str, str] | None = None) -> None:
    """Write COMPLETE last and durably: its presence is what makes the folder a checkpoint. It lists
    every file's size (checked on every load) and, when given, its checksum (checked by
    tools/inspect_checkpoint.py and when a resume looks for the newest intact checkpoint)."""
    files = {k: v for k, v in tree_sizes(folder).items() if k != COMPLETE}
    manifest = {"format": FORMAT, "step": step, "files": files}
    if checksums:
        manifest["checksums"] = {k: v for k, v in sorted(checksums.items()) if k in files}
    tmp = folder / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(manifest))
    fsync_path(tmp)
    os.replace(tmp, folder / COMPLETE)
    fsync_path(folder)


def verify_manifest(folder: Path, checksums: bool = False) -> dict:
    """Check every file listed in COMPLETE exists with its recorded size (and, with `checksums`, its
    recorded checksum, reading every byte); returns the manifest."""
    marker = folder / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{folder}: not a complete llmtrain checkpoint (no {COMPLETE} file)")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker}: unreadable completion manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{marker}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for rel, size in files.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in {marker} but missing")
        if p.stat().st_size != size:
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, the manifest recorded {size} (truncated?)")
    if checksums:
        for rel, want in (manifest.get("checksums") or {}).items():
            got = file_checksum(folder / rel)
            if got != want:
                raise CheckpointError(
                    f"{folder / rel}: checksum {got}, the manifest recorded {want} (corrupted)"
                )
    return manifest


DAMAGED_MARK = ".damaged-"


def set_aside(path: Path, reason: str) -> Path:
    """Rename a damaged checkpoint out of the way (`step_<N>.damaged-<time>`, never listed, never cleaned
    up, never deleted) so that resumes use the next intact one; a note in it says why."""
    target = path.with_name(f"{path.name}{DAMAGED_MARK}{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, target)
    with contextlib.suppress(OSError):
        (target / "DAMAGED.txt").write_text(reason + "\n")
    return target


def fault_point(phase: str, step: int, rank: int) -> None:
    """Fault injection for the atomicity tests (see FAULT_ENV); a no-op unless the variable is set."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, want_phase, want_step, *want_rank = spec.split(":")
    if want_phase == phase and int(want_step) == step and (not want_rank or int(want_rank[0]) == rank):
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)


@contextlib.contextmanager
def staged_by_rank0(staging: Path, build: Callable[[Path], object], what: str) -> Iterator[Path]:
    """A folder that rank 0 builds from scratch while the others wait (converted checkpoints): a failure
    there is raised on every rank as a CheckpointError naming `what`, instead of leaving the other ranks
    waiting for rank 0 forever. Yields the folder for every rank to read; once all are done (or one
    failed), rank 0 removes it. Works without a process group too (one process)."""
    import torch.distributed as dist

    from llmtrain.distributed.collectives import barrier, broadcast_object

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    error: str | None = None
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            build(staging)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    error = broadcast_object(error)
    try:
        if error is not None:
            raise CheckpointError(f"{what} failed on rank 0: {error}")
        yield staging
    finally:
        barrier()
        if rank0:
            shutil.rmtree(staging, ignore_errors=True)
