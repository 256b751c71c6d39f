"""Against a real `mlflow server`: a training job whose server is down at start and again mid-run
loses no point; a run that ends during an outage is replayed by tools/mlflow_replay.py; sweep members
nest under one parent run; tools/plot_runs.py draws what MLflow holds."""

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from llmtrain.config.io import to_dict
from llmtrain.launch.local import free_port
from llmtrain.tracking.mlflow_logger import MLflowLogger, read_delivery_state
from llmtrain.tracking.params import MAX_PARAM_LEN, flatten
from llmtrain.tracking.records import SPILL_FILE, kv_records, metric_records, send_records
from llmtrain.tracking.tracker import Tracker
from tests.tracking.conftest import ENV, TINY, HookedTrainer, train_log
from tools.mlflow_replay import replay
from tools.plot_runs import collect, render

pytestmark = [pytest.mark.mlflow_server, pytest.mark.timeout(240)]
TRAIN_KEYS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_seen", "perf/tokens_per_s",
              "perf/step_time_s", "perf/data_wait_s", "perf/mfu", "sys/mem_gb"]  # fmt: skip


def wait_for(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_outages_at_start_and_mid_run_lose_no_point(mlflow_server_process, make_config, caplog):
    caplog.set_level(logging.WARNING, logger="llmtrain")
    server = mlflow_server_process
    server.stop()  # unreachable when the job starts (not started yet when this test runs first)
    cfg = make_config(*TINY, f"tracking.uri={server.uri}", "run.name=outage", "trainer.max_steps=24",
                      "tracking.max_buffer=20", "checkpoint.enabled=true", "checkpoint.every_steps=12",
                      "tracking.log_model=true")  # fmt: skip
    run_dir = Path(cfg.run.root) / "outage"
    seen = {}

    def server_back(t):
        wait_for(lambda: (run_dir / SPILL_FILE).is_file(), "params spilled to disk while unreachable")
        seen["run_id_while_down"] = t.tracker.run_id
        server.start()
        wait_for(lambda: t.tracker.mlflow.connected and not (run_dir / SPILL_FILE).exists(), "reconnect")

    def server_back_again(t):
        wait_for(lambda: (run_dir / SPILL_FILE).is_file(), "spill to disk during the mid-run outage")
        seen["spilled_mid_run"] = True
        server.start()

    trainer = HookedTrainer(cfg, ENV)
    trainer.hooks = {6: server_back, 12: lambda t: server.stop(), 18: server_back_again}
    out = trainer.train()

    assert seen == {"run_id_while_down": None, "spilled_mid_run": True}
    run_id = out["mlflow"]["run_id"]
    assert run_id and (run_dir / "mlflow_run_id.txt").read_text() == run_id
    assert not (run_dir / SPILL_FILE).exists()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "unreachable" in messages and "answers again" in messages

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten(to_dict(cfg))
    assert "slurm_job_id" not in run.data.tags  # not a SLURM job: no empty tag
    for tag in ("git_commit", "hostname", "world_size", "layout", "engine"):
        assert tag in run.data.tags
    assert run.data.tags["world_size"] == "1" and run.data.tags["engine"] == "native"
    losses = {e["step"]: e["loss"] for e in train_log(run_dir)}
    for key in TRAIN_KEYS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, 25)), key
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [m.value for m in history] == [losses[s] for s in range(1, 25)]
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [24]
    sys_steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_percent")]
    assert sys_steps and len(set(sys_steps)) == len(sys_steps)
    assert sorted(m.step for m in client.get_metric_history(run_id, "checkpoint/size_gb")) == [12, 24]
    assert '"step": 12' in run.data.tags["checkpoint.step_12"]
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",  # the run's tokenizer travels with the weights
        "model/tokenizer_config.json",
    }


def test_run_ended_during_outage_is_replayed(mlflow_server, make_config):
    cfg = make_config(*TINY, f"tracking.uri=http://127.0.0.1:{free_port()}", "run.name=replayed",
                      "checkpoint.enabled=false")  # fmt: skip
    run_dir = Path(cfg.run.root) / "replayed"
    run_dir.mkdir(parents=True)
    tracker = Tracker(cfg, run_dir, True, None, {"engine": "native"})
    expected = {s: 1.0 / s for s in range(1, 51)}
    for s, v in expected.items():
        tracker.log_metrics({"train/loss": v}, s)
    tracker.finish("FINISHED")
    assert tracker.run_id is None and (run_dir / SPILL_FILE).is_file()

    out = replay(run_dir / SPILL_FILE, mlflow_server.uri)
    assert out["left"] == 0 and not (run_dir / SPILL_FILE).exists()
    assert (run_dir / "mlflow_run_id.txt").read_text() == out["run_id"]
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "replayed"
    assert run.data.params == flatten(to_dict(cfg)) and run.data.tags["engine"] == "native"
    got = {m.step: m.value for m in client.get_metric_history(out["run_id"], "train/loss")}
    assert got == expected and len(client.get_metric_history(out["run_id"], "train/loss")) == 50


def test_sweep_members_are_siblings_under_one_parent(mlflow_server, make_config, tmp_path):
    ids = []
    for name in ("sweep-lr_1", "sweep-lr_2"):
        cfg = make_config("tracking=mlflow", f"tracking.uri={mlflow_server.uri}", f"run.name={name}",
                          "tracking.parent_run=sweep-20261123", "tracking.system_metrics=false")  # fmt: skip
        tracker = Tracker(cfg, tmp_path / name, True, None, {})
        tracker.finish()
        ids.append(tracker.run_id)
    client = MlflowClient(mlflow_server.uri)
    parents = {client.get_run(i).data.tags["mlflow.parentRunId"] for i in ids}
    assert len(parents) == 1 and len(set(ids)) == 2
    parent = client.get_run(parents.pop())
    assert parent.info.run_name == "sweep-20261123" and parent.data.tags["llmtrain_role"] == "sweep"


def test_plot_runs_draws_latest_point_per_step(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("plots") or client.create_experiment("plots")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    run_id = client.create_run(exp_id, run_name="plotted").info.run_id
    points = [Metric("train/loss", 5.0 - 0.1 * s, 1000 + s, s) for s in range(1, 21)]
    points += [Metric("perf/tokens_per_s", 1000.0 + s, 1000 + s, s) for s in range(1, 21)]
    points.append(Metric("train/loss", 0.5, 5000, 10))  # a later point at step 10 supersedes 4.0
    client.log_batch(run_id, metrics=points)
    runs = [client.get_run(run_id)]
    data = collect(client, runs, [["train/loss"], ["perf/tokens_per_s"]])
    steps, values = data["plotted"]["train/loss"]
    assert steps == list(range(1, 21)) and values[9] == 0.5 and values[0] == pytest.approx(4.9)
    png = render(data, [["train/loss"], ["perf/tokens_per_s"]], tmp_path / "runs.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_many_params_and_long_values_fit_mlflow(mlflow_server, tmp_path):
    params = flatten({"group": {f"p{i:03d}": i for i in range(350)}, "long": "x" * 10_000, "k" * 300: 1})
    assert len(params["long"]) == MAX_PARAM_LEN and max(map(len, params)) == 250
    logger = MLflowLogger(
        mlflow_server.uri, tmp_path, experiment="t", run_name="params", run_id=None,
        flush_every_s=0.05,
    )  # fmt: skip
    logger.log_params(params)
    logger.finish()
    got = MlflowClient(logger.uri).get_run(logger.run_id).data.params
    assert got == params and len(got) == 352


def test_rejected_batch_is_dropped_and_the_rest_goes_through(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("records") or client.create_experiment("records")
    run_id = client.create_run(exp if isinstance(exp, str) else exp.experiment_id).info.run_id
    client.log_param(run_id, "lr", "1e-3")
    records = kv_records("param", {"lr": "3e-3"}) + metric_records({"train/loss": 1.5}, 3)
    dropped: list[str] = []
    remaining, error = send_records(client, run_id, records, dropped.append)
    assert remaining == [] and error is None and len(dropped) == 1 and "param" in dropped[0]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(3, 1.5)]
    assert client.get_run(run_id).data.params == {"lr": "1e-3"}


def test_hard_crash_then_resume_from_older_checkpoint_logs_each_step_once(mlflow_server, tmp_path):
    """A job dies (no final flush) with steps 11-12 still in memory; the next job resumes from the
    step-8 checkpoint: 9-10 are not logged again (the server has them), 11-12 are (it never got them)."""
    kw = {"experiment": "crash", "run_name": "crash", "flush_every_s": 0.05}
    job1 = MLflowLogger(mlflow_server.uri, tmp_path, run_id=None, **kw)
    for s in range(1, 11):
        job1.log_metrics({"train/loss": 10.0 + s}, s)
    wait_for(lambda: read_delivery_state(tmp_path).get("last_step") == 10, "steps 1-10 delivered")
    job1._stop.set()  # the process dies: its upload thread stops, no final flush ...
    job1._thread.join()
    for s in (11, 12):
        job1.log_metrics({"train/loss": 10.0 + s}, s)  # ... and these never leave memory
    run_id = (tmp_path / "mlflow_run_id.txt").read_text()
    job2 = MLflowLogger(mlflow_server.uri, tmp_path, run_id=run_id, **kw)
    for s in range(9, 15):  # resumed from the step-8 checkpoint
        job2.log_metrics({"train/loss": 20.0 + s}, s)
    job2.finish()
    history = MlflowClient(mlflow_server.uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 15))
    assert {m.step: m.value for m in history} == {
        **{s: 10.0 + s for s in range(1, 11)},
        **{s: 20.0 + s for s in range(11, 15)},
    }


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                  "--run-all-compositor-stages-before-draw", "--virtual-time-budget=60000"]  # fmt: skip


def test_mlflow_ui_draws_the_loss_chart(mlflow_server, tmp_path):
    """What a user sees: the run page of the MLflow UI, rendered by headless Chromium, holds a plotted
    loss line with a vertex per logged step (the chart, not the loading spinner)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (.ci/setup.d/chromium.sh installs it)")
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("ui") or client.create_experiment("ui")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    run_id = client.create_run(exp_id, run_name="ui-run").info.run_id
    losses = [3.0 - 0.05 * s + (0.2 if s % 2 else 0.0) for s in range(1, 21)]  # zig-zag: no vertex merges
    client.log_batch(run_id, metrics=[Metric("train/loss", v, 1000 + s, s) for s, v in enumerate(losses, 1)])
    url = f"{mlflow_server.uri}/#/experiments/{exp_id}/runs/{run_id}/model-metrics"
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    lines = re.findall(r'class="js-line" d="(M[^"]+)"', dom)
    assert "ui-run" in dom and "loss" in dom, dom[-2000:]
    vertices = max((d.count("L") + 1 for d in lines), default=0)
    assert vertices == len(losses), f"{len(lines)} plotted lines, longest has {vertices} vertices"


@pytest.mark.slow  # ~25 s: a server restart
def test_replay_hint_works_as_printed_and_keeps_the_training_times(
    mlflow_server_process, make_config, caplog, tmp_path
):
    """A run ends while its server is down; the warning's replay command, pasted later from another
    folder without the venv, sends it, and the run shows when training started and ended."""
    from tests.tracking.test_commands import run_printed

    caplog.set_level(logging.WARNING, logger="llmtrain")
    server = mlflow_server_process
    server.stop()
    cfg = make_config(*TINY, f"tracking.uri={server.uri}", "run.name=hint", "tracking.system_metrics=false")
    run_dir = Path(cfg.run.root) / "hint"
    run_dir.mkdir(parents=True)
    started = int(time.time() * 1000)
    tracker = Tracker(cfg, run_dir, True, None, {"engine": "native"})
    for s in range(1, 11):
        tracker.log_metrics({"train/loss": 1.0 / s}, s)
    tracker.finish("FINISHED")
    ended = int(time.time() * 1000)
    hint = next(r.getMessage() for r in caplog.records if "still unreachable" in r.getMessage())
    cmd = hint.split("once the server answers: ", 1)[1]
    assert f"--uri {server.uri}" in cmd and str(run_dir.resolve()) in cmd and "<" not in cmd
    time.sleep(1.5)  # the replay happens well after training
    server.start()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run_printed(cmd, elsewhere)
    assert res.returncode == 0, res.stderr
    run = MlflowClient(server.uri).get_run((run_dir / "mlflow_run_id.txt").read_text())
    assert run.info.status == "FINISHED"
    assert started <= run.info.start_time <= run.info.end_time <= ended, (started, run.info, ended)
    assert len(MlflowClient(server.uri).get_metric_history(run.info.run_id, "train/loss")) == 10
