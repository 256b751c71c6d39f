"""Where a resilience event goes: the console (rank 0), MLflow counters and <run_dir>/events.jsonl."""

import json
import math
import time
from pathlib import Path
from typing import Any

from llmtrain.tracking import ConsoleLogger

EVENTS_FILE = "events.jsonl"


def jsonable(x: Any) -> Any:
    """Floats as numbers, NaN/inf as strings (strict JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    return x


def append_event(run_dir: Path, entry: dict[str, Any]) -> None:
    """Append one event line to <run_dir>/events.jsonl (one write of one line: safe from any rank or
    the launcher; the hang watchdog and the restart loop write from wherever they run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / EVENTS_FILE, "a") as f:
        f.write(json.dumps(jsonable(entry)) + "\n")


class EventLog:
    """One JSON line per event (time, step, kind, action, details) and a console warning, on rank 0;
    counters per kind for the tracker."""

    def __init__(self, run_dir: Path, is_main: bool, console: ConsoleLogger) -> None:
        self.path, self.is_main, self.console = run_dir / EVENTS_FILE, is_main, console
        self.counts = {"skipped_steps": 0, "nonfinite": 0, "spikes": 0, "rollbacks": 0, "stragglers": 0}

    def emit(self, step: int, kind: str, action: str, details: dict[str, Any], tracker: Any) -> None:
        """Record one event; `tracker` (llmtrain.tracking.Tracker or None) gets the counters."""
        key = {
            "nonfinite": "nonfinite",
            "spike": "spikes",
            "rollback": "rollbacks",
            "straggler": "stragglers",
        }[kind]
        self.counts[key] += 1
        entry = {"time": time.time(), "step": step, "kind": kind, "action": action, "details": details}
        entry = jsonable(entry)
        what = ", ".join(f"{k}={v}" for k, v in entry["details"].items())
        self.console.warning(f"resilience: {kind} at step {step} -> {action} ({what})")
        if self.is_main:
            append_event(self.path.parent, entry)
        if tracker is not None:
            tracker.log_metrics({f"resilience/{k}": float(v) for k, v in self.counts.items()}, step)
