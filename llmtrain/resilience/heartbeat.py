"""Heartbeats through the rendezvous store: each rank's step, written every few seconds by a thread.

The store is the one the ranks met at (torchrun's agent hosts it; under SLURM rank 0 does), reached
over a separate client connection with a short timeout so that the training thread's own store use is
never interleaved with ours. A rank that is stopped (SIGSTOP) or dead writes nothing: the others name
it by a heartbeat that no longer changes. Keys live under `llmtrain/watch/<attempt>/` so a restarted
job never reads the beats of the previous attempt.
"""

import json
import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from llmtrain.resilience.faults import attempt

STORE_TIMEOUT_S = 10.0
DUMP_KEY = "dump"
"""Set (once, compare-and-set) to the diagnostics folder by the first rank whose watchdog fires."""


def open_store() -> dist.Store | None:
    """A client of the rendezvous store (MASTER_ADDR:MASTER_PORT), or None for one process."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not dist.is_initialized() or dist.get_world_size() == 1 or not addr or not port:
        return None
    store = dist.TCPStore(
        addr, int(port), is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False
    )
    return dist.PrefixStore(f"llmtrain/watch/{attempt()}/", store)


class Heartbeats:
    """This rank's beat (`beat`), the others' (`read_all`), and the shared dump request."""

    def __init__(self, store: dist.Store, rank: int, world_size: int) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.count = 0
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def beat(self, step: int, phase: str) -> None:
        self.count += 1
        value = {"n": self.count, "step": step, "phase": phase, "time": time.time(), **self.me}
        self.store.set(f"hb/{self.rank}", json.dumps(value))

    def read_all(self) -> dict[int, dict[str, Any] | None]:
        """Every rank's last beat (None: none written)."""
        out: dict[int, dict[str, Any] | None] = {}
        for r in range(self.world_size):
            key = f"hb/{r}"
            out[r] = json.loads(self.store.get(key)) if self.store.check([key]) else None
        return out

    def request_dump(self, folder: str) -> str:
        """Ask every rank to dump into `folder`; returns the folder of the first request (ours or an
        earlier rank's), which every rank then uses."""
        return self.store.compare_set(DUMP_KEY, "", folder).decode()

    def dump_requested(self) -> str | None:
        return self.store.get(DUMP_KEY).decode() if self.store.check([DUMP_KEY]) else None

    def stale_ranks(self, window_s: float) -> tuple[dict[int, dict[str, Any] | None], dict[int, dict]]:
        """Ranks whose beat did not change over `window_s` (stopped, dead or wedged with their
        process), and the fresh beats of the others. Compared by the beat counter, not by clocks, so
        hosts with skewed clocks do not matter."""
        first = self.read_all()
        time.sleep(window_s)
        second = self.read_all()

        def unchanged(r: int) -> bool:
            b, a = second[r], first[r]
            return b is None or (a is not None and a["n"] == b["n"])

        stale = {r: second[r] for r in second if r != self.rank and unchanged(r)}
        fresh = {r: b for r, b in second.items() if r not in stale and b is not None}
        return stale, fresh
