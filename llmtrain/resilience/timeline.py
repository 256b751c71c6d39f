"""Where the time of a (re)start goes: wall-clock marks of this process from its creation to its first
training step, one JSON line per start in <run_dir>/starts.jsonl on rank 0 (bench/restart.py reads them;
docs/resilience.md, "Restart cost").

Marks: `process_start` (the OS's creation time of the process), `rendezvous_start` / `rendezvous_done`
(the default process group), `load_start` / `load_done` (the checkpoint), `seek_done` (the data
loader's state restored), `first_step` (the first step after the start finished). Process-wide by
nature, so one module-level instance."""

import json
import os
import time
from pathlib import Path
from typing import Any

import psutil

START_FILE = "starts.jsonl"


class StartTimeline:
    """Marks of one process start; `first_step` writes them the first time it is called."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, forked: bool = False) -> None:
        """Start over from this process's creation: at import, and in a fork (launch/warm.py: a rank
        forked from a server that imported this module long before; `forked` is recorded)."""
        self.marks: dict[str, float] = {"process_start": psutil.Process().create_time()}
        self.written, self.forked = False, forked

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def first_step(self, run_dir: Path, is_main: bool, step: int) -> None:
        """After a step: on the first one of this process, record the marks (rank 0)."""
        if self.written:
            return
        self.written = True
        self.mark("first_step")
        if is_main:
            entry: dict[str, Any] = {"step": step, "forked": self.forked}
            entry |= {k: round(v, 4) for k, v in self.marks.items()}
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / START_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")


START = StartTimeline()
os.register_at_fork(after_in_child=lambda: START.reset(forked=True))
