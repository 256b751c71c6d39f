"""Every end of a job sets the MLflow run's status (local sqlite store): FAILED on an exception in
training or in the resume, KILLED on Ctrl-C; per-key step horizons after a crash; checkpoint tags
after retention; no empty slurm_job_id tag; outage warnings cut at word boundaries."""

import logging
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from llmtrain.data.errors import DataError
from llmtrain.tracking.mlflow_logger import MLflowLogger, read_delivery_state
from llmtrain.train.trainer import Trainer
from tests.tracking.conftest import ENV, TINY, HookedTrainer

pytestmark = pytest.mark.timeout(180)


def _raise(exc: BaseException):
    def hook(trainer: Trainer) -> None:
        raise exc

    return hook


def _run(run_dir: Path):
    client = MlflowClient(f"sqlite:///{run_dir.parent.resolve() / 'mlflow.db'}")
    return client, client.get_run((run_dir / "mlflow_run_id.txt").read_text())


@pytest.fixture(autouse=True)
def _local_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_error_in_training_ends_the_run_failed(make_config) -> None:
    cfg = make_config(*TINY, "run.name=data-error", "trainer.max_steps=8", "checkpoint.enabled=false")
    trainer = HookedTrainer(cfg, ENV)
    trainer.hooks = {3: _raise(DataError("shard_00001.arrow: truncated"))}
    t0 = int(time.time() * 1000)
    with pytest.raises(DataError, match="truncated"):
        trainer.train()
    client, run = _run(trainer.run_dir)
    assert run.info.status == "FAILED"
    assert t0 - 5000 <= run.info.start_time <= run.info.end_time <= int(time.time() * 1000)
    assert run.data.tags["llmtrain.error"] == "DataError: shard_00001.arrow: truncated"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert "slurm_job_id" not in run.data.tags and run.data.tags["world_size"] == "1"


def test_ctrl_c_ends_the_run_killed(make_config) -> None:
    cfg = make_config(*TINY, "run.name=ctrl-c", "trainer.max_steps=8", "checkpoint.enabled=false")
    trainer = HookedTrainer(cfg, ENV)
    trainer.hooks = {2: _raise(KeyboardInterrupt())}
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert _run(trainer.run_dir)[1].info.status == "KILLED"


def test_error_in_resume_ends_the_run_failed(make_config) -> None:
    """The tracker is created after the resume: a resume error still reopens the run folder's run
    (from mlflow_run_id.txt) and ends it FAILED, instead of leaving nothing or a RUNNING run."""
    over = [*TINY, "run.name=bad-resume", "trainer.max_steps=2", "checkpoint.enabled=true"]
    first = Trainer(make_config(*over), ENV).train()
    assert first["status"] == "FINISHED"
    with pytest.raises(Exception, match="model"):  # auto-resume into another model shape is refused
        Trainer(make_config(*over, "trainer.max_steps=4", "model.dim=64"), ENV).train()
    _, run = _run(Path(first["run_dir"]))
    assert run.info.run_id == first["mlflow"]["run_id"]
    assert run.info.status == "FAILED" and "model" in run.data.tags["llmtrain.error"]


def test_retention_marks_deleted_checkpoint_tags(make_config) -> None:
    over = [*TINY, "run.name=retention", "trainer.max_steps=6", "checkpoint.enabled=true",
            "checkpoint.every_steps=2", "checkpoint.keep_last=1"]  # fmt: skip
    out = Trainer(make_config(*over), ENV).train()
    client, run = _run(Path(out["run_dir"]))
    tags = run.data.tags
    assert tags["checkpoint.step_2"] == tags["checkpoint.step_4"] == "deleted (retention)"
    assert '"step": 6' in tags["checkpoint.step_6"] and tags["checkpoint.latest"] == tags["checkpoint.step_6"]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "checkpoint/size_gb")) == [
        2,
        4,
        6,
    ]


def test_key_never_logged_at_a_step_is_logged_after_crash_and_resume(tmp_path: Path) -> None:
    """Job 1 logs train/loss 1..12 and its checkpoint size only at step 5 (the save at 10 was cut off),
    then dies. Job 2 resumes from 5 and saves at 10: that point is new for checkpoint/size_gb and must
    reach the run, while train/loss 6..12 is not logged twice."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = {"experiment": "perkey", "run_name": "perkey", "flush_every_s": 0.05}
    job1 = MLflowLogger(uri, tmp_path, run_id=None, **kw)
    for s in range(1, 13):
        job1.log_metrics({"train/loss": 10.0 + s}, s)
        if s == 5:
            job1.log_metrics({"checkpoint/size_gb": 0.5}, s)
    deadline = time.time() + 60
    while read_delivery_state(tmp_path).get("last_step") != 12:
        assert time.time() < deadline, "job 1's points not delivered"
        time.sleep(0.05)
    job1._stop.set()  # the process dies: no final flush
    job1._thread.join()
    run_id = (tmp_path / "mlflow_run_id.txt").read_text()
    job2 = MLflowLogger(uri, tmp_path, run_id=run_id, **kw)
    for s in range(6, 15):
        job2.log_metrics({"train/loss": 20.0 + s}, s)
        if s == 10:
            job2.log_metrics({"checkpoint/size_gb": 0.7}, s)
    job2.finish()
    client = MlflowClient(uri)
    sizes = {m.step: m.value for m in client.get_metric_history(run_id, "checkpoint/size_gb")}
    assert sizes == {5: 0.5, 10: 0.7}
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 15))
    assert {m.step: m.value for m in losses} == {
        **{s: 10.0 + s for s in range(1, 13)},
        **{s: 20.0 + s for s in (13, 14)},
    }
    assert client.get_run(run_id).info.status == "FINISHED"


def test_outage_warning_is_not_cut_mid_word(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from llmtrain.launch.local import free_port

    caplog.set_level(logging.WARNING, logger="llmtrain")
    uri = f"http://127.0.0.1:{free_port()}"
    logger = MLflowLogger(uri, tmp_path, experiment="e", run_name="r", run_id=None, request_timeout_s=2)
    logger._stop.set()
    with pytest.raises(Exception) as raw:  # the error the logger saw, in full
        MlflowClient(uri).get_experiment_by_name("e")
    full = str(raw.value).splitlines()[0]
    message = next(r.getMessage() for r in caplog.records if "unreachable" in r.getMessage())
    reason = message.split("unreachable (", 1)[1].split("). Training continues", 1)[0]
    assert len(full) > 200 and len(reason) <= 200
    assert reason.endswith(" ... ([Errno 111] Connection refused)"), reason
    head = reason.removesuffix(" ... ([Errno 111] Connection refused)")
    assert full.startswith(head) and full[len(head)] == " ", head  # whole words only


def test_shorten_cuts_at_word_boundaries() -> None:
    from llmtrain.tracking.records import shorten

    text = "alpha beta gamma delta epsilon " * 10
    out = shorten(text, 40)
    assert out == "alpha beta gamma delta epsilon alpha ..."
    assert shorten("short line\nsecond line") == "short line"
    long = "x" * 50 + " failed: [Errno 111] Connection refused'))"
    assert shorten(long, 40).endswith("... ([Errno 111] Connection refused)")
