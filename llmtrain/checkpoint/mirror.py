"""A mirror of the run's checkpoints in object storage (`checkpoint.mirror=s3://bucket/prefix`).

Checkpoints are written to the run folder exactly as without a mirror (atomic rename, manifest last,
SIGKILL-tested; object stores have no rename), and each complete one is then uploaded by rank 0 in a
background thread, off the training loop:

    <mirror>/step_<N:08d>/...        every object of the checkpoint, then
    <mirror>/step_<N:08d>/COMPLETE   the manifest, uploaded last

A remote step folder without COMPLETE (an upload in progress, or one cut off) is never listed, so a
reader never sees a partial checkpoint. A failed upload (the server down, a network error) is retried
`storage.upload_retries` times with a doubling backoff; if it still fails it is reported (a log error,
`failures`), its partial objects are removed, the previous remote checkpoint stays the newest, and
training goes on. After each upload the retention rule of the run (keep_last/keep_every) is applied
to the remote copies too (COMPLETE deleted first, as locally).

A run with no local checkpoint (a new node, a wiped scratch disk) resumes from the newest complete
checkpoint of its mirror: it is downloaded into the run's checkpoint folder (COMPLETE last, through a
`.tmp-` folder) and loaded from there as any local checkpoint, so resharding works as usual.
`checkpoint.resume` / `checkpoint.init_from` may name `s3://` (any fsspec URI) checkpoints too: they
are downloaded once into `<run>/remote_checkpoints/` (see `localize`).
"""

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from llmtrain.checkpoint.folder import (
    COMPLETE,
    STEP_RE,
    TMP_MARK,
    CheckpointError,
    is_remote,
    latest_checkpoint,
    verify_manifest,
)
from llmtrain.checkpoint.manager import retained_steps
from llmtrain.config.checkpoint import CheckpointConfig
from llmtrain.config.storage import StorageConfig
from llmtrain.data.objstore import filesystem_for, put_tree

log = logging.getLogger("llmtrain")
UPLOAD_DIR = ".mirror-upload"
"""Folder of the run holding hard-linked snapshots of the checkpoints being uploaded."""
CACHE_DIR = "remote_checkpoints"
"""Folder of the run holding checkpoints downloaded for checkpoint.resume / init_from URIs."""


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def remote_steps(uri: str) -> list[tuple[int, str]]:
    """Complete checkpoints under a remote folder (those with a COMPLETE object), oldest first, as
    (step, URI)."""
    fs, root = filesystem_for(uri)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        m = STEP_RE.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if m and fs.exists(_join(entry, COMPLETE)):
            out.append((int(m.group(1)), _join(uri, entry.rstrip("/").rsplit("/", 1)[-1])))
    return sorted(out)


def download(uri: str, dest: Path) -> Path:
    """Copy the remote checkpoint `uri` (a step folder) to the local folder `dest`: every object into
    `<dest>.tmp-download`, COMPLETE last, checked against the manifest, then renamed into place."""
    fs, root = filesystem_for(uri)
    tmp = dest.with_name(dest.name + TMP_MARK + "download")
    shutil.rmtree(tmp, ignore_errors=True)
    keys = sorted(fs.find(root), key=lambda k: k.endswith("/" + COMPLETE))
    if not keys or not keys[-1].endswith("/" + COMPLETE):
        raise CheckpointError(f"{uri}: not a complete llmtrain checkpoint (no {COMPLETE} object)")
    for key in keys:
        target = tmp / key[len(root.rstrip("/")) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(target))
    verify_manifest(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def newest_remote(uri: str) -> str:
    """A remote checkpoint as given (it holds COMPLETE), or the newest complete one in it or in its
    `checkpoints/` folder (a mirror, or a run folder uploaded whole)."""
    fs, root = filesystem_for(uri)
    if fs.exists(_join(root, COMPLETE)):
        return uri.rstrip("/")
    for folder in (uri, _join(uri, "checkpoints")):
        steps = remote_steps(folder)
        if steps:
            return steps[-1][1]
    raise CheckpointError(f"{uri}: no complete llmtrain checkpoint there (a step_<N> folder with {COMPLETE})")


class CheckpointMirror:
    """Uploads of one run's complete checkpoints to `uri` (rank 0), one at a time in a thread."""

    def __init__(
        self, uri: str, local: Path, ck: CheckpointConfig, storage: StorageConfig,
        after_object: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.uri, self.local = uri.rstrip("/"), Path(local)
        self.keep_last, self.keep_every = ck.keep_last, ck.keep_every
        self.retries, self.backoff_s = storage.upload_retries, storage.retry_backoff_s
        self.after_object = after_object
        """Called after each uploaded object with its relative path (the tests stop the server there)."""
        self.uploaded: list[int] = []
        self.failures: list[str] = []
        self.deleted: list[str] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-upload")
        self._pending: list[Future] = []
        shutil.rmtree(self.local.parent / UPLOAD_DIR, ignore_errors=True)  # snapshots of a killed run

    def upload(self, path: Path) -> Future:
        """Queue the upload of a complete local checkpoint; returns at once. The files are hard-linked
        into a snapshot first, so local retention may delete the checkpoint while it uploads."""
        snap = self.local.parent / UPLOAD_DIR / path.name  # outside checkpoints/: its cleanup skips it
        shutil.rmtree(snap, ignore_errors=True)
        snap.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(path, snap, copy_function=os.link)
        fut = self._pool.submit(self._upload, path.name, snap)
        self._pending.append(fut)
        return fut

    def wait(self) -> None:
        """Block until every queued upload finished (uploaded or given up; never raises)."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def _upload(self, name: str, snap: Path) -> bool:
        dest, step = _join(self.uri, name), int(STEP_RE.match(name).group(1))
        try:
            for attempt in range(1, self.retries + 1):
                try:
                    self._remove(dest)  # a partial earlier attempt (or the same step saved again)
                    put_tree(snap, dest, last=(COMPLETE,), after_object=self.after_object)
                except Exception as e:  # the server down, network, permissions: retried, then given up
                    error = f"{type(e).__name__}: {e}"
                    log.warning(
                        "upload of %s failed (attempt %d of %d): %s", dest, attempt, self.retries, error
                    )
                    if attempt < self.retries:
                        time.sleep(self.backoff_s * 2 ** (attempt - 1))
                    continue
                self.uploaded.append(step)
                log.info("checkpoint step %d uploaded to %s", step, dest)
                self._retention()
                return True
            self.failures.append(f"step {step}: {error}")
            log.error(
                "checkpoint step %d was not uploaded to %s after %d attempts (%s); the newest uploaded "
                "checkpoint there stays the previous one, training goes on",
                step, dest, self.retries, error,
            )  # fmt: skip
            with contextlib.suppress(Exception):
                self._remove(dest)
            return False
        finally:
            shutil.rmtree(snap, ignore_errors=True)

    def _remove(self, dest: str) -> None:
        """Delete a remote step folder, its COMPLETE first (an interrupted delete leaves an unlisted one)."""
        fs, root = filesystem_for(dest)
        if fs.exists(_join(root, COMPLETE)):
            fs.rm_file(_join(root, COMPLETE))
        keys = fs.find(root)
        if keys:
            fs.rm(keys)

    def _retention(self) -> None:
        """keep_last / keep_every on the remote copies, and remote folders of uploads that never completed."""
        try:
            steps = remote_steps(self.uri)
            keep = retained_steps([s for s, _ in steps], self.keep_last, self.keep_every)
            for s, uri in steps:
                if s not in keep:
                    self._remove(uri)
                    self.deleted.append(uri)
            fs, root = filesystem_for(self.uri)
            complete = {u.rsplit("/", 1)[-1] for _, u in steps}
            for entry in fs.ls(root, detail=False):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if STEP_RE.match(name) and name not in complete:
                    self._remove(_join(self.uri, name))
        except Exception as e:  # retention is housekeeping: a failure is reported, never fatal
            log.warning("retention on %s failed: %s: %s", self.uri, type(e).__name__, e)

    def catch_up(self) -> Path | None:
        """Queue the upload of the newest local checkpoint when the mirror has nothing as new (the job
        was stopped before its last upload finished); returns it, or None when the mirror is current."""
        newest = latest_checkpoint(self.local)
        if newest is None:
            return None
        steps = remote_steps(self.uri)
        if steps and steps[-1][0] >= int(STEP_RE.match(newest.name).group(1)):
            return None
        try:
            verify_manifest(newest)
        except CheckpointError as e:  # the resume sets it aside; nothing to upload
            log.warning("not uploading %s: %s", newest, e)
            return None
        self.upload(newest)
        return newest

    def restore_newest(self) -> Path | None:
        """When the local checkpoint folder holds no complete checkpoint, download the newest complete
        one of the mirror into it; returns its local path (None when there is nothing to restore)."""
        if latest_checkpoint(self.local) is not None:
            return None
        steps = remote_steps(self.uri)
        if not steps:
            return None
        step, uri = steps[-1]
        self.local.mkdir(parents=True, exist_ok=True)
        return download(uri, self.local / f"step_{step:08d}")


def fetch_cached(uri: str, run_dir: Path) -> Path:
    """A remote checkpoint (or the newest in a remote folder) downloaded once into
    `<run>/remote_checkpoints/<hash>/step_<N>`; a complete earlier download is reused."""
    src = newest_remote(uri)
    name = src.rsplit("/", 1)[-1]
    dest = run_dir / CACHE_DIR / hashlib.sha1(src.encode()).hexdigest()[:12] / name
    with contextlib.suppress(CheckpointError):
        verify_manifest(dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    return download(src, dest)


def localize(
    ck: CheckpointConfig, run_dir: Path, mirror: "CheckpointMirror | None"
) -> tuple[CheckpointConfig, list[str]]:
    """The checkpoint config with remote `resume` / `init_from` URIs replaced by local downloads, after
    restoring the mirror's newest checkpoint when the run has none locally (rank 0, before plan_resume).
    Returns it with notes for the console."""
    notes = []
    if mirror is not None and ck.resume == "auto":
        restored = mirror.restore_newest()
        if restored is not None:
            notes.append(f"no local checkpoint: restored {restored.name} from checkpoint.mirror={mirror.uri}")
    if mirror is not None and (behind := mirror.catch_up()) is not None:
        notes.append(f"checkpoint.mirror={mirror.uri} lacks {behind.name}: uploading it in the background")
    changes = {}
    for key in ("resume", "init_from"):
        value = getattr(ck, key)
        if is_remote(value):
            try:
                changes[key] = str(fetch_cached(str(value), run_dir))
            except (CheckpointError, OSError) as e:
                raise CheckpointError(f"checkpoint.{key}={value}: {e}") from e
            notes.append(f"checkpoint.{key}={value}: downloaded to {changes[key]}")
    return dataclasses.replace(ck, **changes), notes


def build_mirror(ck: CheckpointConfig, storage: StorageConfig, folder: Path) -> CheckpointMirror | None:
    """The run's mirror when checkpoint.mirror is set (rank 0 uploads; the others pass None)."""
    return CheckpointMirror(ck.mirror, folder, ck, storage) if ck.mirror else None
