"""Hang watchdog: a per-rank thread that knows the step in progress and ends the job when it takes
too long (docs/resilience.md "Hangs").

The deadline of a step is `hang_factor` x the median of the recent step times, within
[hang_min_s, hang_max_s]; until `hang_warmup_steps` steps were timed, and between steps (saves,
validation, start-up, resume), it is `hang_startup_s`. The same thread writes this rank's heartbeat to
the rendezvous store every `heartbeat_s` and watches for another rank's dump request. On firing it
dumps this rank's threads, asks every rank to dump too, names the ranks whose heartbeat stopped, logs
the event (console, events.jsonl, MLflow through `on_fire`), ends the stopped ranks of its own host
(a SIGSTOPped rank ignores the launcher's SIGTERM and would be waited for) and exits with
HANG_EXIT_CODE, which the launcher reports and may restart from (resilience.max_restarts).
"""

import contextlib
import logging
import os
import signal
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtrain.config.resilience import ResilienceConfig
from llmtrain.resilience.diagnostics import dump_rank, new_folder
from llmtrain.resilience.events import append_event
from llmtrain.resilience.heartbeat import Heartbeats, open_store

log = logging.getLogger("llmtrain")

HANG_EXIT_CODE = 75
"""Exit code of a rank whose watchdog fired (EX_TEMPFAIL: a temporary failure, worth a restart)."""


class StepClock:
    """The deadline of the step in progress, from the measured step times. The first
    `hang_warmup_steps` steps (compilation, allocator and loader warm-up) are not timed; until one
    step after them was, the deadline is the start-up allowance."""

    def __init__(self, cfg: ResilienceConfig, window: int = 20) -> None:
        self.cfg = cfg
        self.times: deque[float] = deque(maxlen=window)
        self.seen = 0

    def add(self, seconds: float) -> None:
        self.seen += 1
        if self.seen > self.cfg.hang_warmup_steps:
            self.times.append(seconds)

    def step_deadline(self) -> float:
        c = self.cfg
        if not self.times:
            return c.hang_startup_s
        return min(max(c.hang_factor * statistics.median(self.times), c.hang_min_s), c.hang_max_s)

    def describe(self) -> str:
        if not self.times:
            return f"start-up allowance resilience.hang_startup_s={self.cfg.hang_startup_s:g}"
        med = statistics.median(self.times)
        return (
            f"{self.cfg.hang_factor:g} x median step {med:.3f}s within "
            f"[{self.cfg.hang_min_s:g}, {self.cfg.hang_max_s:g}] s"
        )


class HangWatchdog:
    """One per rank; the trainer calls `step_started(step)` and `step_done()` around each step."""

    def __init__(
        self,
        cfg: ResilienceConfig,
        rank: int,
        world_size: int,
        run_dir: Path,
        on_fire: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg, self.rank, self.run_dir, self.on_fire = cfg, rank, run_dir, on_fire
        self.clock = StepClock(cfg)
        self.mark: tuple[int, str, float] = (0, "start-up", time.monotonic())
        """(step, phase, since): replaced in one assignment by the training thread, read once per tick."""
        store = open_store() if cfg.hang_watchdog else None
        self.beats = Heartbeats(store, rank, world_size) if store is not None else None
        self.dumped: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llmtrain-hang-watchdog", daemon=True)
        self._store_failed = False

    def start(self) -> "HangWatchdog":
        """Start the thread (nothing with resilience.hang_watchdog=false: the calls are then no-ops)."""
        if self.cfg.hang_watchdog and self._thread.ident is None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def step(self) -> int:
        return self.mark[0]

    @property
    def phase(self) -> str:
        return self.mark[1]

    def step_started(self, step: int) -> None:
        now = time.monotonic()
        _, phase, since = self.mark
        if phase == "step":  # a skipped step (resilience) went straight to the next one
            self.clock.add(now - since)
        self.mark = (step, "step", now)

    def step_done(self) -> None:
        _, phase, since = self.mark
        if phase == "step":
            self.clock.add(time.monotonic() - since)
        self.between_steps()

    def between_steps(self) -> None:
        """Untimed work inside a step's iteration (a rollback's checkpoint load): start-up allowance."""
        self.mark = (self.mark[0], "between steps", time.monotonic())

    def limit(self, phase: str | None = None) -> float:
        phase = self.phase if phase is None else phase
        return self.clock.step_deadline() if phase == "step" else self.cfg.hang_startup_s

    def _loop(self) -> None:
        tick = min(self.cfg.heartbeat_s, 1.0)
        last_beat = 0.0
        while not self._stop.wait(tick):
            if self.beats is not None and time.monotonic() - last_beat >= self.cfg.heartbeat_s:
                last_beat = time.monotonic()
                self._beat()
            mark = self.mark
            waited = time.monotonic() - mark[2]
            if waited > self.limit(mark[1]) and not self._stop.is_set() and mark is self.mark:
                self.fire(waited)

    def _beat(self) -> None:
        """Write the heartbeat; dump when another rank asked. A store that does not answer (its host
        stopped) is reported once and retried: the deadline still fires."""
        assert self.beats is not None
        try:
            self.beats.beat(self.step, self.phase)
            folder = self.beats.dump_requested()
            if folder and folder != self.dumped:
                self.dumped = folder
                dump_rank(Path(folder), self.rank, f"dump requested by another rank at step {self.step}")
        except Exception as e:
            if not self._store_failed:
                log.error("hang watchdog: rank %d cannot reach the rendezvous store: %s", self.rank, e)
            self._store_failed = True

    def fire(self, waited: float) -> None:
        """Dump, name, log, end: see the module docstring. Does not return."""
        why = (
            f"no progress for {waited:.1f}s at step {self.step} ({self.phase}; deadline {self.limit():.1f}s: "
        )
        why += (self.clock.describe() if self.phase == "step" else "resilience.hang_startup_s") + ")"
        folder, first = self._agree_folder()
        dump_rank(folder, self.rank, f"hang watchdog fired: {why}")
        stale, fresh = self._name_ranks()
        message = f"hang watchdog on rank {self.rank}: {why}; " + describe_ranks(stale, fresh, self.step)
        message += f"; stacks in {folder}; exiting with code {HANG_EXIT_CODE}"
        log.error(message)
        details = {
            "rank": self.rank,
            "waited_s": round(waited, 2),
            "deadline_s": round(self.limit(), 2),
            "phase": self.phase,
            "stale_ranks": sorted(stale),
            "diagnostics": str(folder),
        }
        if first:
            append_event(self.run_dir, {"time": time.time(), "step": self.step, "kind": "hang",
                                        "action": "exit", "details": details})  # fmt: skip
        self._report(message, details)
        kill_local(stale)
        os._exit(HANG_EXIT_CODE)

    def _agree_folder(self) -> tuple[Path, bool]:
        """The diagnostics folder every rank uses (the first rank to fire picks it) and whether we did."""
        mine = str(new_folder(self.run_dir))
        if self.beats is None:
            return Path(mine), True
        try:
            chosen = self.beats.request_dump(mine)
        except Exception:
            return Path(mine), True
        self.dumped = chosen
        return Path(chosen), chosen == mine

    def _name_ranks(self) -> tuple[dict[int, Any], dict[int, Any]]:
        """Stale and fresh ranks; waits 2 heartbeats (the others also dump meanwhile)."""
        if self.beats is None:
            return {}, {}
        try:
            return self.beats.stale_ranks(2 * self.cfg.heartbeat_s)
        except Exception as e:  # the store's host is the stopped one (SLURM: rank 0 hosts it)
            return {0: {"error": f"rendezvous store unreachable: {e}"}}, {}

    def _report(self, message: str, details: dict[str, Any]) -> None:
        """Hand the event to `on_fire` (MLflow on rank 0), bounded: the job must end either way."""
        if self.on_fire is None:
            return
        t = threading.Thread(target=self.on_fire, args=(message, details), daemon=True)
        t.start()
        t.join(timeout=15)


def describe_ranks(stale: dict[int, Any], fresh: dict[int, Any], step: int) -> str:
    """'ranks that stopped reporting: 1 (last heartbeat at step 3, host h, pid p); ...'"""
    if not stale and not fresh:
        return "one process: no other rank to name"
    parts = []
    for r, b in sorted(stale.items()):
        where = (
            "no heartbeat"
            if b is None
            else b.get("error")
            or (f"last heartbeat at step {b['step']} ({b['phase']}), host {b['host']} pid {b['pid']}")
        )
        parts.append(f"{r} ({where})")
    text = "ranks that stopped reporting: " + (", ".join(parts) if parts else "none")
    behind = sorted(r for r, b in fresh.items() if b["step"] < step)
    if behind:
        text += f"; ranks still reporting but behind step {step}: {behind}"
    return text


def kill_local(stale: dict[int, Any]) -> None:
    """SIGKILL the stale ranks that run on this host: stopped, they ignore the SIGTERM the launcher
    sends and it would wait its whole shutdown timeout; a hung rank has nothing left to save."""
    host = socket.gethostname()
    for b in stale.values():
        if b and b.get("host") == host and b.get("pid"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(b["pid"]), signal.SIGKILL)


class HangDetected(RuntimeError):
    """The watchdog fired: the MLflow run ends FAILED with this message (a restart reopens it)."""


def report_hang(tracker: Any, step: int, message: str) -> None:
    """MLflow (rank 0's llmtrain.tracking.Tracker, None elsewhere): a `resilience/hangs` count at the
    step, the message in tag `resilience.hang.step_<step>` (llmtrain.error is overwritten by a later
    failure) and the run ended FAILED, flushed before the exit; a restart reopens the same run."""
    if tracker is not None:
        tracker.log_metrics({"resilience/hangs": 1.0}, step)
        if tracker.mlflow is not None:
            tracker.mlflow.set_tags({f"resilience.hang.step_{step}": message})
        tracker.fail(HangDetected(message))
