"""The commands llmtrain prints work as printed: run from another directory, in a shell without the
virtual environment (no VIRTUAL_ENV, its bin/ not on PATH, no PYTHONPATH)."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from llmtrain.launch.local import free_port
from llmtrain.launch.runs import JobRecord
from llmtrain.tracking.records import SPILL_FILE, SpillFile, metric_records

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).absolute().parent
pytestmark = pytest.mark.timeout(240)
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64",
        "data.seq_len=32", "trainer.micro_batch_size=4", "trainer.global_batch_size=4", "trainer.max_steps=3",
        "trainer.val_every=0", "trainer.num_threads=1", "tracking.system_metrics=false"]  # fmt: skip


def clean_env() -> dict[str, str]:
    """A shell where the venv is not activated."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MLFLOW_TRACKING_URI")
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and Path(p).absolute() != VENV_BIN
    )
    return env


def run_printed(cmd: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_entry_point_by_name_only_when_path_finds_this_environments(monkeypatch) -> None:
    from llmtrain.tracking.commands import entry_point

    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}/usr/bin")
    assert entry_point("mlflow", "mlflow") == ["mlflow"]
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert entry_point("mlflow", "mlflow") == [str(Path(sys.executable).absolute()), "-m", "mlflow"]


@pytest.mark.slow  # ~25 s: a training run and an `mlflow ui` start
def test_local_run_prints_a_working_ui_command_and_status_shows_its_log(shakespeare_dir, tmp_path) -> None:
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    elsewhere.mkdir()
    train = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", f"data.sources.0.path={shakespeare_dir}", f"run.root={runs}",
         "run.name=cmds", *TINY],
        cwd=tmp_path, env={**clean_env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    ui = re.search(r"open the UI: (.+)", train.stderr).group(1)
    assert str(VENV_BIN) not in os.environ["PATH"].split(os.pathsep) or ui.startswith("mlflow ")

    status = run_printed(
        f"{shlex.quote(sys.executable)} {ROOT / 'tools/runs.py'} status {runs / 'cmds'}", elsewhere
    )
    assert status.returncode == 0, status.stderr
    log_file = runs / "cmds" / "train.log"
    assert re.search(rf"^log +{re.escape(str(log_file))}$", status.stdout, re.M), status.stdout
    assert "step 3/3" in log_file.read_text() and "run finished at step 3" in log_file.read_text()
    assert ui in status.stdout  # the MLflow line holds the same command

    port = free_port()
    proc = subprocess.Popen(f"{ui} --port {port}", shell=True, cwd=elsewhere, start_new_session=True,
                            env={**clean_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        run_id = (runs / "cmds" / "mlflow_run_id.txt").read_text()
        body = _get(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}", proc)
        assert json.loads(body)["run"]["info"]["run_name"] == "cmds"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _get(url: str, proc: subprocess.Popen, timeout: float = 90) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the printed mlflow ui command exited"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def test_slurm_submission_commands_work_as_printed(make_config, tmp_path, capsys) -> None:
    from llmtrain.launch.slurm import _announce

    cfg = make_config("launcher=slurm", f"run.root={tmp_path / 'runs'}", "run.name=sub")
    run_dir = tmp_path / "runs" / "sub"
    (run_dir / "slurm").mkdir(parents=True)
    out, err = run_dir / "slurm" / "990001_0_log.out", run_dir / "slurm" / "990001_0_log.err"
    out.write_text("printed\n")
    err.write_text("12:00:00 step 1/10 | loss 5.0\n")
    rec = JobRecord("990001", "sub", str(run_dir), None, time.time(), str(out), str(err))
    (run_dir / "slurm" / "jobs.jsonl").write_text(json.dumps(rec.__dict__) + "\n")
    _announce(cfg, rec, "debug")
    printed = dict(re.findall(r"^  (\w+): +(.+)$", capsys.readouterr().out, re.M))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    status = run_printed(printed["status"], elsewhere)
    assert status.returncode == 0, status.stderr
    assert re.search(rf"^log +{re.escape(str(err))}$", status.stdout, re.M), (
        status.stdout
    )  # rank 0's log lines
    cancel = run_printed(printed["cancel"], elsewhere)
    assert cancel.returncode == 0 and "sub: no live job" in cancel.stdout, cancel.stderr
    follow = subprocess.Popen(printed["follow"], shell=True, cwd=elsewhere, env=clean_env(),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert follow.stdout.readline() and "step 1/10" in "".join(follow.stdout.readline() for _ in range(4))
    finally:
        os.killpg(follow.pid, signal.SIGKILL)
        follow.wait()


def test_replay_against_an_unreachable_server_is_one_line_and_fails(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    SpillFile(
        run_dir / SPILL_FILE, {"op": "run", "experiment": "e", "run_name": "r", "parent_run": None}
    ).append(metric_records({"train/loss": 1.0}, 1))
    t0 = time.time()
    cmd = [
        sys.executable,
        str(ROOT / "tools/mlflow_replay.py"),
        str(run_dir),
        "--uri",
        f"http://127.0.0.1:{free_port()}",
    ]
    res = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode == 1 and time.time() - t0 < 30
    assert len(lines) == 1 and "not usable" in lines[0] and "1 record(s) kept" in lines[0], lines
    assert (run_dir / SPILL_FILE).is_file()
