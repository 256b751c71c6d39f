"""The spill file: append, read back, keep only the unsent remainder, survive a torn last line."""

import json

from llmtrain.tracking.records import SpillFile, kv_records, max_step, metric_records, read_spill


def test_spill_round_trip_and_torn_line(tmp_path):
    header = {"op": "run", "experiment": "e", "run_name": "r", "parent_run": None}
    spill = SpillFile(tmp_path / "mlflow_spill.jsonl", header)
    first = metric_records({"train/loss": 2.5, "train/lr": 1e-3}, 7) + kv_records("tag", {"k": "v" * 9000})
    spill.append(first)
    spill.append(metric_records({"train/loss": 2.25}, 8))
    with open(spill.path, "a") as f:
        f.write('{"op": "metric", "key": "train/lo')  # killed mid-write
    got_header, records = read_spill(spill.path)
    assert got_header == header and len(records) == 4 and max_step(records) == 8
    assert [r["value"] for r in records if r["op"] == "metric"] == [2.5, 1e-3, 2.25]
    assert len(records[2]["value"]) == 8000  # tag values cut to MLflow's limit
    spill.replace(records[3:])
    assert [json.loads(line)["op"] for line in spill.path.read_text().splitlines()] == ["run", "metric"]
    spill.replace([])
    assert not spill.exists() and read_spill(spill.path) == (None, [])
