"""MLflow tracking from rank 0: batched, asynchronous, one run per training job, outage tolerant.

The training thread only appends records to a list (microseconds). A background thread uploads them
with `MlflowClient.log_batch` (per-call logging costs 3-7 ms a point here; a batch of 1000 points
0.05-0.2 s). When the server is unreachable, records stay in memory up to `max_buffer` and are then
spilled to `<run_dir>/mlflow_spill.jsonl`; when it answers again the spill is sent first, then the
memory backlog. A run that could not be created at start is created when the server comes back (its
id is then written to `<run_dir>/mlflow_run_id.txt`). What is still unsent at the end stays in the
spill file, which the next job of the same run folder (or `tools/mlflow_replay.py`) uploads.

Steps are never logged twice: `<run_dir>/mlflow_state.json` keeps, per metric key, the highest step
the server (or the spill file) has accepted; after a resume from an older checkpoint the points of a
key up to its step are not logged again (see docs/tracking.md, "Resume"), while a key that was never
logged at a step (e.g. `checkpoint/size_gb` of a checkpoint the crashed job did not write) still is.
"""

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from llmtrain.tracking.records import (
    SPILL_FILE,
    Record,
    SpillFile,
    kv_records,
    max_step_per_key,
    metric_records,
    now_ms,
    read_spill,
    send_records,
    shorten,
)

log = logging.getLogger("llmtrain")
RUN_ID_FILE = "mlflow_run_id.txt"
STATE_FILE = "mlflow_state.json"


def default_uri(runs_root: str | Path) -> str:
    """$MLFLOW_TRACKING_URI, else a sqlite store beside the runs."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}"


def read_delivery_state(run_dir: Path) -> dict[str, Any]:
    """mlflow_state.json of a run folder: which steps the tracking server already accepted (per key),
    how many jobs logged into the run. Not the checkpoint's TrainerState."""
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_delivery_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(run_dir / STATE_FILE)


def accepted_steps(state: dict[str, Any]) -> tuple[dict[str, int], int]:
    """(highest accepted step per key, the step assumed for other keys). A state file written before
    steps were kept per key only has `last_step`, which then stands for every key."""
    per_key = {k: int(v) for k, v in state.get("steps", {}).items()}
    default = -1 if "steps" in state else int(state.get("last_step", -1))
    return per_key, default


def record_accepted(state: dict[str, Any], records: list[Record]) -> bool:
    """Raise the per-key (and overall `last_step`) horizons in `state` to what `records` hold; True
    when anything changed (the caller then writes the state file)."""
    steps, default = accepted_steps(state)
    changed = "steps" not in state
    for key, step in max_step_per_key(records).items():
        if step > steps.get(key, default):
            steps[key], changed = step, True
    if changed:
        state["steps"] = steps
        state["last_step"] = max([int(state.get("last_step", -1)), *steps.values()])
    return changed


def replay_command(run_dir: Path, uri: str) -> str:
    """The `tools/mlflow_replay.py` command for a run folder, pasteable from any directory."""
    from llmtrain.tracking.commands import python_tool
    from llmtrain.tracking.params import redact_url

    args = [str(Path(run_dir).resolve())]
    if redact_url(uri) == uri:  # never print a password; the tool then finds the URI by itself
        args += ["--uri", uri]
    return python_tool("mlflow_replay.py", "llmtrain.tracking.replay", *args)


class MLflowLogger:
    """Owns the MLflow run of one run folder; only the upload thread talks to the server."""

    def __init__(
        self,
        uri: str,
        run_dir: Path,
        *,
        experiment: str,
        run_name: str,
        run_id: str | None,
        flush_every_s: float = 2.0,
        max_buffer: int = 100_000,
        request_timeout_s: int = 10,
        parent_run: str | None = None,
        artifact_location: str | None = None,
    ) -> None:
        # Fail fast and let our loop retry: MLflow's default is 7 retries with exponential backoff,
        # i.e. minutes inside one call while the server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout_s))
        self.uri, self.run_dir = uri, Path(run_dir)
        self.experiment, self.run_name, self.parent_run = experiment, run_name, parent_run
        self.artifact_location = artifact_location
        self.run_id = run_id
        self.max_buffer, self.flush_every_s = max_buffer, flush_every_s
        self.state = read_delivery_state(self.run_dir)
        self.skip, self.skip_default = accepted_steps(self.state)  # accepted in an earlier job, per key
        header = {"op": "run", "experiment": experiment, "run_name": run_name, "parent_run": parent_run,
                  "start_time": now_ms()}  # fmt: skip
        self.spill = SpillFile(self.run_dir / SPILL_FILE, header)
        self.start_time = int(self.spill.header["start_time"])  # a new run starts when training did
        self.client: Any = None
        self.connected = False
        self.outage_since: float | None = None
        self.num_spilled = 0
        self._pending: list[Record] = []  # appended by the training thread
        self._backlog: list[Record] = []  # owned by the upload thread
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._connect_or_warn()
        self._thread = threading.Thread(target=self._loop, name="mlflow-upload", daemon=True)
        self._thread.start()

    # -- training-thread side (never blocks on the network) ------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.skip.get(k, self.skip_default)}
        if fresh:
            self._put(metric_records(fresh, step))

    def log_params(self, params: dict[str, Any]) -> None:
        self._put(kv_records("param", params))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put(kv_records("tag", tags))

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        """Queue an upload of `folder` (sent by the upload thread, after the metrics queued before)."""
        self._put([{"op": "artifacts", "path": str(folder), "artifact_path": artifact_path}])

    def _put(self, records: list[Record]) -> None:
        with self._lock:
            self._pending.extend(records)

    # -- upload thread ------------------------------------------------------------------------
    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        self.run_id = open_run(
            client,
            self.run_dir,
            run_id=self.run_id,
            experiment=self.experiment,
            run_name=self.run_name,
            parent_run=self.parent_run,
            artifact_location=self.artifact_location,
            start_time=self.start_time,
        )
        self.client, self.connected = client, True

    def _connect_or_warn(self) -> None:
        try:
            self._connect()
        except Exception as e:
            self._enter_outage(e)

    def _enter_outage(self, e: Exception) -> None:
        self.connected = False
        if self.outage_since is None:
            self.outage_since = time.time()
            log.warning(
                "mlflow: tracking server %s unreachable (%s). Training continues; metrics are buffered "
                "(%d points in memory, then spilled to %s) and sent when it answers again.",
                self.uri,
                shorten(str(e)),
                self.max_buffer,
                self.spill.path,
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            self._flush_once()

    def _flush_once(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        self._backlog.extend(batch)
        try:
            if not self.connected:
                self._connect()
            if self.spill.exists():
                self._send_spill()
            remaining, error = send_records(self.client, self.run_id, self._backlog, log.warning)
            self._mark_accepted(self._backlog[: len(self._backlog) - len(remaining)])
            self._backlog = remaining
            if error is not None:
                raise error
            if self.outage_since is not None:
                log.warning(
                    "mlflow: tracking server %s answers again after %.0f s; buffered metrics flushed (%d "
                    "points went through the spill file)",
                    self.uri,
                    time.time() - self.outage_since,
                    self.num_spilled,
                )
                self.outage_since = None
        except Exception as e:
            self._enter_outage(e)
            if len(self._backlog) > self.max_buffer:
                self._spill_backlog()

    def _send_spill(self) -> None:
        _, records = self.spill.read()
        # an earlier job's final status would mark this running job as ended: the server keeps ours
        records = [r for r in records if r["op"] != "status"]
        remaining, error = send_records(self.client, self.run_id, records, log.warning)
        self.spill.replace(remaining)
        if error is not None:
            raise error

    def _spill_backlog(self) -> None:
        self.spill.append(self._backlog)
        self.num_spilled += sum(r["op"] == "metric" for r in self._backlog)
        self._mark_accepted(self._backlog)
        self._backlog = []

    def _mark_accepted(self, records: list[Record]) -> None:
        """Persist the highest step per key now safe from loss (on the server or in the spill file)."""
        if record_accepted(self.state, records):
            write_delivery_state(self.run_dir, self.state)

    # -- end of run -----------------------------------------------------------------------------
    def finish(self, status: str = "FINISHED") -> None:
        """Final flush and run status; leaves a spill file if the server is still down."""
        self._put([{"op": "status", "value": status, "end_time": now_ms()}])
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)
        self._flush_once()
        if self._backlog:
            self._spill_backlog()
        if self.spill.exists():
            log.warning(
                "mlflow: tracking server %s still unreachable at the end of the run; %d unsent records "
                "kept in %s. The next job of this run folder sends them, or, once the server answers: %s",
                self.uri,
                len(read_spill(self.spill.path)[1]),
                self.spill.path,
                replay_command(self.run_dir, self.uri),
            )


def open_run(
    client: Any,
    run_dir: Path,
    *,
    run_id: str | None,
    experiment: str,
    run_name: str,
    parent_run: str | None = None,
    artifact_location: str | None = None,
    start_time: int | None = None,
) -> str:
    """Mark `run_id` RUNNING, or create the run (and its experiment, and its sweep parent) when there
    is none or the server does not know it; the id is written to `<run_dir>/mlflow_run_id.txt`.
    A new run gets `start_time` (ms; when its training started, which a late connection or a replay
    of the spill file would otherwise replace by "now")."""
    if run_id is not None:
        try:
            client.update_run(run_id, status="RUNNING")
        except Exception as e:
            if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("mlflow: run %s does not exist on this server; starting a new run", run_id)
            run_id = None
    if run_id is None:
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(experiment, artifact_location=artifact_location)
        )
        tags = {"llmtrain_run_dir": str(Path(run_dir).resolve())}
        if parent_run:
            tags["mlflow.parentRunId"] = find_or_create_parent(client, exp_id, parent_run)
            tags["llmtrain_sweep"] = parent_run
        run_id = client.create_run(exp_id, start_time=start_time, run_name=run_name, tags=tags).info.run_id
    (Path(run_dir) / RUN_ID_FILE).write_text(run_id)
    return run_id


def find_or_create_parent(client: Any, exp_id: str, name: str) -> str:
    """The sweep's parent run (tag llmtrain_sweep=<name>), created by its first member."""
    found = client.search_runs(
        [exp_id], filter_string=f"tags.llmtrain_sweep = '{name}' and tags.llmtrain_role = 'sweep'"
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=name, tags={"llmtrain_sweep": name, "llmtrain_role": "sweep"})
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
