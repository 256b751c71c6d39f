"""Graceful stop: a signal sets a flag; the ranks agree on it at the next step boundary.

SLURM sends the pre-timeout signal (USR2 via --signal) or SIGTERM on preemption to each task at
slightly different moments, so a rank must never act on its own flag alone: `should_stop` takes the
max over all ranks, and everybody saves and exits at the same step.
"""

import signal
import threading

from llmtrain.distributed.collectives import any_rank


class StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGUSR2 (or programmatically); read collectively at step boundaries."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")

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
        self.signal_name = signal.Signals(signum).name
        self.received.add(self.signal_name)
        self._event.set()

    def set(self, reason: str = "requested") -> None:
        self.signal_name = reason
        self._event.set()

    def local(self) -> bool:
        return self._event.is_set()

    def should_stop(self) -> bool:
        """True on every rank if any rank was signalled (one all-reduce of one int)."""
        return any_rank(self._event.is_set())
