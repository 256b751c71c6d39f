"""One injected loss spike in a real run: flagged at that step only, skipped, counted in MLflow and
events.jsonl, and the run equals the one that never saw that batch."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.resilience.test_nonfinite import _assert_bitwise, _run, _state

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
SPIKE = [
    "trainer.max_steps=30",
    "resilience.spike=skip",
    "resilience.spike_warmup=10",
    "resilience.spike_window=20",
]


def test_injected_spike_is_skipped_counted_and_logged(make_config, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, t = _run(make_config, "spike", *SPIKE, "tracking=mlflow", "resilience.inject_spike_steps=[24]")
    ref_out, ref = _run(make_config, "spike_ref", *SPIKE, drop=(24, 1))
    assert not (Path(ref_out["run_dir"]) / "events.jsonl").exists()  # no false alarm in the clean run
    events = [json.loads(x) for x in (Path(out["run_dir"]) / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["kind"], e["action"], e["details"]["data_step"]) for e in events] == [
        (24, "spike", "skip", 24)
    ]
    assert events[0]["details"]["z"] > 6.0
    assert [h["loss"] for h in out["history"]] == [h["loss"] for h in ref_out["history"]]
    _assert_bitwise(
        _state(t.engine.model, t.engine.optimizer), _state(ref.engine.model, ref.engine.optimizer)
    )
    client = MlflowClient(out["mlflow"]["uri"])
    run_id = out["mlflow"]["run_id"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "resilience/skipped_steps")] == [
        (24, 1.0)
    ]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "resilience/spikes")] == [(24, 1.0)]
