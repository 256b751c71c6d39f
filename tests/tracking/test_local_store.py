"""The embedded default (sqlite under the runs folder) and run continuity across a crash and resume
from an older checkpoint: one MLflow run, every step exactly once."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from llmtrain.tracking.tracker import Tracker
from llmtrain.train.trainer import Trainer
from tests.tracking.conftest import ENV, TINY, HookedTrainer

pytestmark = pytest.mark.timeout(180)
SECRET = "s3cr3t-do-not-log"


def test_default_store_and_resume_from_older_checkpoint(make_config, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    over = [*TINY, "run.name=resumed", "trainer.max_steps=16", "trainer.val_every=6", "checkpoint.enabled=true",
            "checkpoint.every_steps=6", "checkpoint.save_at_end=false", f"+tracking.tags.hf_token={SECRET}",
            "+tracking.tags.team=nlp"]  # fmt: skip
    crashed = HookedTrainer(make_config(*over), ENV)
    crashed.hooks = {10: lambda t: t.stop.set("test crash")}  # steps 7..10 are lost with the job
    first = crashed.train()
    assert first["status"] == "KILLED" and first["step"] == 10
    second = Trainer(make_config(*over), ENV).train()  # resumes from step 6, redoes 7..10
    assert second["status"] == "FINISHED"

    root = Path(make_config().run.root)
    run_id = first["mlflow"]["run_id"]
    assert second["mlflow"] == {"run_id": run_id, "uri": f"sqlite:///{root.resolve() / 'mlflow.db'}"}
    client = MlflowClient(second["mlflow"]["uri"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (
        client.get_experiment(run.info.experiment_id).artifact_location
        == (root.resolve() / "mlartifacts").as_uri()
    )

    job1 = {e["step"]: e["loss"] for e in first["history"]}  # steps 1..10
    job2 = {e["step"]: e["loss"] for e in second["history"]}  # steps 7..16
    assert sorted(job1) == list(range(1, 11)) and sorted(job2) == list(range(7, 17))
    for s in range(7, 11):  # the redone steps reproduce the lost ones (deterministic CPU resume)
        assert job2[s] == pytest.approx(job1[s], rel=1e-6)
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 17))  # strictly increasing, no duplicate
    expected = {**job1, **{s: v for s, v in job2.items() if s > 10}}  # first logged value per step
    assert {m.step: m.value for m in history} == expected
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [6, 12, 16]
    sys_steps = [m.step for m in client.get_metric_history(run_id, "system/ram_used_gb")]
    assert len(sys_steps) == len(set(sys_steps)) and max(sys_steps) <= 16
    tags = run.data.tags
    assert (
        tags["llmtrain.jobs"] == "2"
        and "steps 7..10 were logged by an earlier job" in tags["llmtrain.resume.2"]
    )
    assert tags["team"] == "nlp" and "hf_token" not in tags
    assert all(SECRET not in v for v in [*run.data.params.values(), *tags.values()])
    assert run.data.params["trainer.max_steps"] == "16" and run.data.params["data.tokenizer"] == "byte"


def test_tracking_none_writes_nothing(make_config, tmp_path):
    cfg = make_config()  # the test default is tracking=none
    tracker = Tracker(cfg, tmp_path / "run", True, None, {})
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.finish()
    assert tracker.run_id is None and tracker.describe() == {"run_id": None, "uri": None}
    assert not (tmp_path / "run").exists() and not list(Path(cfg.run.root).glob("mlflow.db"))
