"""Tracking records: what the training thread hands to the uploader, and the spill file on disk.

Every MLflow write is a small JSON-able dict, so the same record can sit in memory, be spilled to
`<run_dir>/mlflow_spill.jsonl` while the server is unreachable, and be replayed later by the
uploader of a resumed job or by `tools/mlflow_replay.py`:

    {"op": "run", "experiment": ..., "run_name": ..., "parent_run": ..., "start_time": ms}   first line
    {"op": "metric", "key": ..., "value": ..., "timestamp": ms, "step": n}
    {"op": "param", "key": ..., "value": ...}
    {"op": "tag", "key": ..., "value": ...}
    {"op": "artifacts", "path": local folder, "artifact_path": name in the run}
    {"op": "status", "value": "FINISHED" | "FAILED" | "KILLED", "end_time": ms}

`start_time` (when the job that spilled first started) and `end_time` (when training ended) let a
replay days later show the run's real training window, not the time of the replay.
"""

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

SPILL_FILE = "mlflow_spill.jsonl"
MAX_KEY_LEN = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_TAG_LEN = 8000  # MAX_TAG_VAL_LENGTH
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

Record = dict[str, Any]


def metric_records(metrics: dict[str, float], step: int) -> list[Record]:
    ts = int(time.time() * 1000)
    return [
        {"op": "metric", "key": k, "value": float(v), "timestamp": ts, "step": int(step)}
        for k, v in metrics.items()
    ]


def kv_records(op: str, items: dict[str, Any]) -> list[Record]:
    limit = MAX_TAG_LEN if op == "tag" else 6000
    out = []
    for k, v in items.items():
        s = str(v)
        out.append(
            {"op": op, "key": str(k)[:MAX_KEY_LEN], "value": s if len(s) <= limit else s[: limit - 3] + "..."}
        )
    return out


def max_step(records: Iterable[Record]) -> int:
    return max((r["step"] for r in records if r["op"] == "metric"), default=-1)


def max_step_per_key(records: Iterable[Record]) -> dict[str, int]:
    """The highest step per metric key: a key logged only now and then (checkpoint/size_gb, val/loss)
    keeps its own horizon, so a resumed job still logs it at steps that key never had."""
    out: dict[str, int] = {}
    for r in records:
        if r["op"] == "metric" and r["step"] > out.get(r["key"], -1):
            out[r["key"]] = r["step"]
    return out


def now_ms() -> int:
    return int(time.time() * 1000)


def shorten(text: str, width: int = 200) -> str:
    """First line of `text`, cut at a word boundary (never mid-word) with " ..." when too long; the
    OS error inside a wrapped HTTP error ("[Errno 111] Connection refused") is kept at the end."""
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) <= width:
        return line
    errno = re.search(r"\[Errno -?\d+\][^'\")\]]*", line)
    tail = f" ... ({errno.group(0).strip()})" if errno else " ..."
    head = line[: max(width - len(tail), 20)]
    if line[len(head)] != " " and " " in head:  # do not end inside a word
        head = head[: head.rfind(" ")]
    return head.rstrip(" ,;:(") + tail


def send_records(
    client: Any, run_id: str, records: list[Record], on_drop: Callable[[str], None]
) -> tuple[list[Record], Exception | None]:
    """Upload `records` in order with `log_batch` (within MLflow's per-batch limits).

    Returns the records not sent because of a transient error (the caller keeps them for later) and
    that error (None when everything went through).
    A batch the server rejects for good (e.g. a param re-logged with another value) is dropped and
    reported through `on_drop`, so that one bad value can never block the stream forever.
    """
    from mlflow.entities import Metric, Param, RunTag

    i = 0
    while i < len(records):
        op = records[i]["op"]
        limit = MAX_METRICS_PER_BATCH if op == "metric" else MAX_PARAMS_TAGS_PER_BATCH
        j = i
        while j < len(records) and records[j]["op"] == op and j - i < limit:
            j += 1
        if op in ("status", "artifacts"):
            j = i + 1
        chunk = records[i:j]
        try:
            if op == "metric":
                ms = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in chunk]
                client.log_batch(run_id, metrics=ms, synchronous=True)
            elif op == "param":
                client.log_batch(
                    run_id, params=[Param(r["key"], r["value"]) for r in chunk], synchronous=True
                )
            elif op == "tag":
                client.log_batch(run_id, tags=[RunTag(r["key"], r["value"]) for r in chunk], synchronous=True)
            elif op == "status":
                client.set_terminated(run_id, status=chunk[0]["value"], end_time=chunk[0].get("end_time"))
            elif op == "artifacts":
                client.log_artifacts(run_id, chunk[0]["path"], artifact_path=chunk[0]["artifact_path"])
        except Exception as e:
            if not (is_permanent(e) or isinstance(e, (FileNotFoundError, NotADirectoryError))):
                return records[i:], e
            on_drop(f"mlflow rejected {len(chunk)} {op} record(s) for run {run_id}: {e}")
        i = j
    return [], None


PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


def is_permanent(e: Exception) -> bool:
    """A server-side rejection (retrying cannot help) as opposed to an outage or a timeout."""
    return getattr(e, "error_code", None) in PERMANENT_ERRORS


class SpillFile:
    """Append-only JSONL backlog of records not yet accepted by the tracking server."""

    def __init__(self, path: Path, header: Record) -> None:
        self.path = Path(path)
        # a spill left by an earlier job keeps its header: its start_time is the run's real start
        self.header = {**header, **(spill_header(self.path) or {})}

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def append(self, records: list[Record]) -> None:
        new = not self.exists()
        with open(self.path, "a") as f:
            if new:
                f.write(json.dumps(self.header) + "\n")
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> tuple[Record | None, list[Record]]:
        return read_spill(self.path)

    def replace(self, remaining: list[Record]) -> None:
        """Keep only `remaining` (atomically); remove the file when nothing is left."""
        if not remaining:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.header) + "\n")
            f.writelines(json.dumps(r) + "\n" for r in remaining)
        tmp.replace(self.path)


def spill_header(path: str | Path) -> Record | None:
    """The first line of a spill file (without reading the rest, which may be large)."""
    try:
        with open(path) as f:
            first = json.loads(f.readline() or "null")
    except (OSError, json.JSONDecodeError):
        return None
    return first if isinstance(first, dict) and first.get("op") == "run" else None


def read_spill(path: str | Path) -> tuple[Record | None, list[Record]]:
    """(header, records) of a spill file; a torn last line (killed mid-write) is ignored."""
    header, records = None, []
    if not Path(path).is_file():
        return None, []
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("op") == "run":
            header = header or r
        else:
            records.append(r)
    return header, records
