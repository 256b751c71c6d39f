"""Graceful stop: a signal sets a flag; the ranks agree on it at the next step boundary.

SLURM sends the pre-timeout signal (USR2 via --signal) or SIGTERM on preemption to each task at
slightly different moments, so a rank must never act on its own flag alone: `should_stop` takes the
max over all ranks, and everybody saves and exits at the same step.

SIGINT (Ctrl-C) and SIGHUP (terminal closed) stop the same way as SIGTERM; a second Ctrl-C means "now":
it raises KeyboardInterrupt. Before the trainer installs its flag (start-up), `interrupt_on_signals`
turns the same signals into `Interrupted`, so a stop there is one line and a 128+signal exit code, not
a traceback. `watch_parent` makes a rank stop when the process that started it dies (even by SIGKILL).
"""

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

from llmtrain.distributed.collectives import any_rank

log = logging.getLogger("llmtrain")

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
"""Signals that mean "stop this job" (as opposed to SLURM's USR1/USR2 "requeue me")."""
PR_SET_PDEATHSIG = 1
ORPHAN_GRACE_S = 60.0
"""After the parent died a rank gets this long to save and leave before it exits on its own."""


def exit_code(signal_name: str | None) -> int:
    """Shell convention for a job ended by a signal: 128 + its number (130 for SIGINT, 143 for TERM)."""
    try:
        return 128 + int(signal.Signals[signal_name or ""])
    except KeyError:
        return 1


class StopFlag:
    """Set by SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 (or programmatically); read at step boundaries."""

    SIGNALS = (*STOP_SIGNALS, "SIGUSR1", "SIGUSR2")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self.received: set[str] = set()
        """Every signal seen by this process (the SLURM launcher requeues on USR1/USR2, not TERM)."""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and "SIGINT" in self.received:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
        self.signal_name = name
        self.received.add(name)
        self._event.set()

    def set(self, reason: str = "requested") -> None:
        self.signal_name = reason
        self._event.set()

    def local(self) -> bool:
        return self._event.is_set()

    def should_stop(self) -> bool:
        """True on every rank if any rank was signalled (one all-reduce of one int)."""
        return any_rank(self._event.is_set())


class Interrupted(BaseException):
    """A stop signal arrived before training started (nothing to save yet)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT/SIGHUP raise `Interrupted` (the trainer's StopFlag, once
    installed, takes them over); the previous handlers are back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [getattr(signal, n) for n in STOP_SIGNALS]
    previous = {s: signal.signal(s, _raise_interrupted) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def watch_parent(grace_s: float = ORPHAN_GRACE_S, poll_s: float = 0.5) -> None:
    """Stop this process when its parent (the launcher's agent, torchrun, srun) dies, even by SIGKILL.

    The kernel sends SIGTERM at once (prctl PR_SET_PDEATHSIG, Linux), which the trainer treats as a
    graceful stop; a watchdog thread also polls the parent pid (other kernels, or a parent thread that
    exited) and, if the process is still alive `grace_s` after its parent died (e.g. blocked in a
    collective with a dead peer), ends it so that nothing outlives the job.
    """
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("the launching process (pid %d) is gone: stopping this rank", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(exit_code("SIGTERM"))

    threading.Thread(target=watchdog, name="llmtrain-parent-watch", daemon=True).start()
