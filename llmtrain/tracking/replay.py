"""Upload a spilled MLflow buffer (`<run_dir>/mlflow_spill.jsonl`) into a tracking server.

A run that lost its tracking server keeps the unsent metrics, params, tags and final status in its
run folder. The next job of the same run folder sends them by itself; use this command when there is
no next job (the run finished during the outage), or to send them to another server:

    python tools/mlflow_replay.py runs/my-run           # the run's tracking.uri (or the default store)
    python tools/mlflow_replay.py runs/my-run --uri http://mlflow:5000
    python tools/mlflow_replay.py runs/my-run --dry-run              # count what would be sent

The records go to the run in `<run_dir>/mlflow_run_id.txt` when the server knows it, else to a new run
created with the spilled experiment and run name (its id is then written to that file, so a later
resume continues it). A run created here starts when its training started and ends when training
ended (times kept in the spill file), not at the time of the replay. Sent records are removed from
the spill file; on failure the unsent remainder stays there and the command exits with status 1 (an
unreachable server: one line, after at most --timeout seconds per request).
"""

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from llmtrain.tracking.mlflow_logger import (
    RUN_ID_FILE,
    default_uri,
    open_run,
    read_delivery_state,
    record_accepted,
    write_delivery_state,
)
from llmtrain.tracking.params import redact_url
from llmtrain.tracking.records import SPILL_FILE, SpillFile, read_spill, send_records, shorten
from llmtrain.tracking.tracker import artifact_root

log = logging.getLogger("llmtrain")


def replay(spill_path: Path, uri: str, run_id: str | None = None, dry_run: bool = False) -> dict:
    """Send the spill file's records; returns {"run_id", "sent": {op: count}, "left": n}."""
    run_dir = spill_path.parent
    header, records = read_spill(spill_path)
    if header is None and not records:
        raise SystemExit(f"mlflow_replay: nothing to replay in {spill_path} (missing or empty)")
    header = header or {"experiment": "llmtrain", "run_name": run_dir.name, "parent_run": None}
    counts = dict(Counter(r["op"] for r in records))
    if dry_run:
        return {"run_id": run_id, "sent": {}, "would_send": counts, "left": len(records)}
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: the caller retries
    id_file = run_dir / RUN_ID_FILE
    if run_id is None and id_file.is_file():
        run_id = id_file.read_text().strip() or None
    client = MlflowClient(tracking_uri=uri)
    run_id = open_run(
        client,
        run_dir,
        run_id=run_id,
        experiment=header["experiment"],
        run_name=header["run_name"],
        parent_run=header.get("parent_run"),
        artifact_location=artifact_root(uri, run_dir.parent),
        start_time=header.get("start_time"),
    )
    if not any(r["op"] == "status" for r in records):  # the job was cut off before its end
        last = max((r["timestamp"] for r in records if r["op"] == "metric"), default=None)
        records.append({"op": "status", "value": "KILLED", "end_time": last})
    remaining, error = send_records(client, run_id, records, log.warning)
    if error is not None:
        log.warning("mlflow_replay: stopped by %s", shorten(str(error)))
    SpillFile(spill_path, header).replace(remaining)
    state = read_delivery_state(run_dir)
    if record_accepted(state, records):
        write_delivery_state(run_dir, state)
    sent = dict(Counter(r["op"] for r in records[: len(records) - len(remaining)]))
    return {"run_id": run_id, "sent": sent, "left": len(remaining)}


def configured_uri(run_dir: Path) -> str:
    """The run's own tracking.uri from its resolved config.yaml, else the default store."""
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        from omegaconf import OmegaConf

        uri = OmegaConf.select(OmegaConf.load(cfg_file), "tracking.uri")
        if uri:
            return str(uri)
    return default_uri(run_dir.parent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mlflow_replay.py", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help=f"run folder (holding {SPILL_FILE}) or the spill file itself")
    p.add_argument(
        "--uri",
        help="tracking URI (default: the run's tracking.uri, $MLFLOW_TRACKING_URI, <runs root>/mlflow.db)",
    )
    p.add_argument("--run-id", help="send into this run instead of the run folder's run")
    p.add_argument("--dry-run", action="store_true", help="only count the records")
    p.add_argument("--timeout", type=int, default=10, help="seconds per request to the server (default 10)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(args.timeout))
    spill = args.path / SPILL_FILE if args.path.is_dir() else args.path
    uri = args.uri or configured_uri(spill.parent)
    try:
        out = replay(spill, uri, args.run_id, args.dry_run)
    except Exception as e:  # unreachable or refusing server: one line, the spill file stays as it is
        left = len(read_spill(spill)[1])
        print(
            f"mlflow_replay: tracking server {redact_url(uri)} not usable ({shorten(str(e))}); nothing "
            f"sent, {left} record(s) kept in {spill}",
            file=sys.stderr,
        )
        return 1
    if args.dry_run:
        print(f"{spill}: would send {out['would_send']}")
        return 0
    print(
        f"replayed {out['sent']} into run {out['run_id']} at {redact_url(uri)}; {out['left']} record(s) left"
    )
    return 1 if out["left"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
