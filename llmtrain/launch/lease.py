"""An exclusive lease on a run folder for a job's lifetime: two jobs never write one run folder.

`<run_dir>/.lease` is a small JSON file naming the holder (host, pid, SLURM job id, since when) and a
heartbeat timestamp that a background thread refreshes every HEARTBEAT_S seconds. It is created with
`os.link` of a private temporary file, which fails when the lease exists (atomic on local disks and on
NFS, where O_EXCL was not always), under an flock of the run folder where the filesystem offers one.

An existing lease is taken over, with a warning, when it is stale:
- it belongs to this SLURM job (a requeued job takes over its own lease, silently);
- its SLURM job is known to SLURM and no longer pending or running;
- it is on this host and its pid is dead (or now another process: start times are compared);
- it is on another host and its heartbeat is older than STALE_AFTER_S.
Otherwise the job is refused with `LeaseHeld`, before it writes anything into the run folder.
"""

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

log = logging.getLogger("llmtrain")

LEASE_NAME = ".lease"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 90.0
"""A lease from another host whose heartbeat is older than this is taken over (9 missed beats)."""


class LeaseHeld(RuntimeError):
    """Another live job holds the run folder; the message names it and what to do."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in the lease file."""

    host: str
    pid: int
    pid_started: float
    slurm_job_id: str
    since: float
    heartbeat: float
    token: str

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host}{job}, since {when}"


def _started(pid: int) -> float:
    """Process start time (0 when the process does not exist): tells a reused pid from the holder."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0


def _me(pid: int | None = None) -> Holder:
    pid = os.getpid() if pid is None else pid
    now = time.time()
    job = os.environ.get("SLURM_JOB_ID", "")
    return Holder(socket.gethostname(), pid, _started(pid), job, now, now, uuid.uuid4().hex)


def read_holder(run_dir: Path) -> Holder | None:
    """The lease's holder, or None when there is no (readable) lease."""
    try:
        data = json.loads((run_dir / LEASE_NAME).read_text())
        return Holder(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:  # half-written by a crashed writer: treat as stale
        log.warning("unreadable lease %s (%s): treating it as stale", run_dir / LEASE_NAME, e)
        return Holder("?", 0, 0.0, "", 0.0, 0.0, "")


def stale_reason(holder: Holder, now: float | None = None) -> str | None:
    """Why `holder` no longer holds the lease, or None while it does."""
    now = time.time() if now is None else now
    if holder.slurm_job_id and holder.slurm_job_id == os.environ.get("SLURM_JOB_ID"):
        return "own"  # this SLURM job, requeued: its previous allocation held the lease
    if holder.slurm_job_id:
        from llmtrain.launch.runs import ACTIVE_STATES, job_states

        state = job_states([holder.slurm_job_id])[holder.slurm_job_id]
        if state in ACTIVE_STATES:
            return None
        if state != "UNKNOWN":
            return f"SLURM job {holder.slurm_job_id} is {state}"
    if holder.host == socket.gethostname():
        started = _started(holder.pid)
        if started and abs(started - holder.pid_started) < 1.0:
            return None
        return f"pid {holder.pid} is no longer running"
    age = now - holder.heartbeat
    if age > STALE_AFTER_S:
        return f"no heartbeat from host {holder.host} for {age:.0f} s (limit {STALE_AFTER_S:.0f} s)"
    return None


@contextlib.contextmanager
def _folder_lock(run_dir: Path) -> Iterator[None]:
    """flock on the run folder itself (no extra file): serialises check-and-take between processes of
    one host (and NFSv4 clients); where a filesystem refuses it, the atomic link alone decides."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(run_dir: Path, holder: Holder, replace: bool) -> bool:
    """Write the lease file whole (temporary file, then link or rename): readers never see half."""
    tmp = run_dir / f"{LEASE_NAME}.{holder.token}.tmp"
    tmp.write_text(json.dumps(asdict(holder)))
    try:
        if replace:
            tmp.replace(run_dir / LEASE_NAME)
            return True
        try:
            os.link(tmp, run_dir / LEASE_NAME)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


class Lease:
    """This job's hold on a run folder; `release()` (or leaving `hold`) gives it back."""

    def __init__(self, run_dir: Path, holder: Holder) -> None:
        self.run_dir, self.holder = run_dir, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="llmtrain-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with _folder_lock(self.run_dir):
                current = read_holder(self.run_dir)
                if current is None or current.token != self.holder.token:
                    log.error("lost the lease on %s to %s", self.run_dir, current and current.describe())
                    return
                _write(self.run_dir, Holder(**{**asdict(self.holder), "heartbeat": time.time()}), True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still ours."""
        self._stop.set()
        with contextlib.suppress(OSError), _folder_lock(self.run_dir):
            current = read_holder(self.run_dir)
            if current is not None and current.token == self.holder.token:
                (self.run_dir / LEASE_NAME).unlink()
        _HELD.discard(self)


_HELD: set[Lease] = set()


def _refusal(run_dir: Path, holder: Holder) -> LeaseHeld:
    return LeaseHeld(
        f"{run_dir} is in use by {holder.describe()}: wait for that job to end, stop it, "
        f"or choose another run.name (the lease is {run_dir / LEASE_NAME})"
    )


def acquire(run_dir: Path, pid: int | None = None) -> Lease:
    """Take the lease on `run_dir` (created if missing) for this process, or raise LeaseHeld."""
    run_dir.mkdir(parents=True, exist_ok=True)
    me = _me(pid)
    with _folder_lock(run_dir):
        for _ in range(3):  # a holder may release between our link and our read
            if _write(run_dir, me, replace=False):
                break
            holder = read_holder(run_dir)
            if holder is None:
                continue
            reason = stale_reason(holder)
            if reason is None:
                raise _refusal(run_dir, holder)
            if reason != "own":
                log.warning("taking over the stale lease of %s: %s", holder.describe(), reason)
            _write(run_dir, me, replace=True)
            break
        else:
            raise LeaseHeld(f"could not take the lease {run_dir / LEASE_NAME}: it keeps changing hands")
    lease = Lease(run_dir, me)
    _HELD.add(lease)
    return lease


def check_free(run_dir: Path) -> None:
    """Raise LeaseHeld when a live job holds `run_dir` (used before submitting a SLURM job)."""
    holder = read_holder(run_dir)
    if holder is not None and stale_reason(holder) is None:
        raise _refusal(run_dir, holder)


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[Lease]:
    """The lease for the duration of the block."""
    lease = acquire(run_dir)
    try:
        yield lease
    finally:
        lease.release()


def release_held() -> None:
    """Release every lease this process holds (before an `os._exit`, which skips `finally` blocks)."""
    for lease in list(_HELD):
        lease.release()
