"""The `llmtrain` process end to end, as `kill`, `timeout`, Ctrl-C and a second terminal would treat it:
signals reach the ranks, which save at the step boundary; nothing outlives the launcher, not even a
SIGKILLed one; a second job on the same run folder is refused while the first runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llmtrain.checkpoint import list_checkpoints
from tests.launch.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
LONG = ["trainer.max_steps=1000000", "checkpoint.every_steps=0", "trainer.log_every=100000"]


def _start(args: list[str], cwd: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """`python -m llmtrain.cli ...` with stdout+stderr in a file (a full pipe would stall it)."""
    out = cwd / f"{name}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(out, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmtrain.cli", *args],
            cwd=cwd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    return proc, out


def _overrides(shakespeare_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.sources.0.path={shakespeare_dir}", "tracking=none", f"run.root={tmp_path}", *extra]


def _steps(run_dir: Path) -> list[int]:
    log = run_dir / "train_log.jsonl"
    return [json.loads(x)["step"] for x in log.read_text().splitlines()] if log.is_file() else []


def _wait_for_steps(proc: subprocess.Popen, run_dir: Path, out: Path, n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_steps(run_dir)) < n:
        assert proc.poll() is None, (
            f"ended with {proc.returncode} before step {n}:\n{out.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"fewer than {n} steps after {timeout_s} s"
        time.sleep(0.2)


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training ranks below the launcher (whatever sits in between): worker commands, or the
    children of the warm fork server (launch/warm.py, resilience.max_restarts > 0)."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in kids if p.cmdline()[-2:-1] == ["llmtrain.launch.worker"] and "-u" in p.cmdline()]
    servers = [p for p in kids if "forkserver" in " ".join(p.cmdline())]
    ranks += [c for s in servers for c in s.children()]
    assert len(ranks) == 2, [p.cmdline() for p in kids]
    return kids


def _alive(procs: list[psutil.Process]) -> list[int]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _reap(launcher: subprocess.Popen, procs: list[psutil.Process]) -> list[int]:
    """Kill the launcher and whatever it left running; return the pids that had survived it."""
    if launcher.poll() is None:
        launcher.kill()
        launcher.wait(timeout=10)
    survivors = _alive(procs)
    for p in procs:
        if p.pid in survivors:
            p.kill()
    return survivors


def _llmtrain_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("llmtrain")]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_second_job_is_refused_and_sigterm_stops_the_first_at_a_step_boundary(shakespeare_dir, tmp_path):
    args = _overrides(shakespeare_dir, tmp_path, "launcher.nproc=2", "run.name=shared", *LONG)
    run_dir = tmp_path / "shared"
    first, first_out = _start(args, tmp_path, "first")
    procs: list[psutil.Process] = []
    try:
        _wait_for_steps(first, run_dir, first_out, 3)
        procs = _ranks(first)
        config_mtime = (run_dir / "config.yaml").stat().st_mtime_ns
        second = subprocess.run(
            [sys.executable, "-m", "llmtrain.cli", *args],
            cwd=tmp_path,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.poll() is None, "the first job ended before the second was tried"
        assert second.returncode == 2, second.stderr[-3000:]
        lines = _llmtrain_lines(second.stderr)
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"{run_dir} is in use by pid {first.pid} on host" in lines[0] and "since 20" in lines[0]
        assert (run_dir / "config.yaml").stat().st_mtime_ns == config_mtime  # wrote nothing there

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=90) == 128 + signal.SIGTERM
    finally:
        survivors = _reap(first, procs)
    text = first_out.read_text()
    steps = _steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # one entry per step: the second job trained none
    # saved where the ranks stopped (the step boundary after the signal), and said so in one line
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [steps[-1]]
    assert _llmtrain_lines(text) == [
        f"llmtrain: stopped by SIGTERM; saved {run_dir / 'checkpoints' / f'step_{steps[-1]:08d}'}: "
        "run the same command to resume from it"
    ]
    assert "Traceback" not in text and "SignalException" not in text
    assert survivors == []
    assert not (run_dir / ".lease").exists()


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("restarts", [0, 1])
def test_sigkilled_launcher_takes_its_ranks_with_it(shakespeare_dir, tmp_path, restarts):
    """Also with in-job restarts, whose ranks are forks of the launcher's warm server: the server
    exits with the launcher, and its children get their parent-death signal."""
    extra = [f"resilience.max_restarts={restarts}", *LONG]
    args = _overrides(shakespeare_dir, tmp_path, "launcher.nproc=2", "run.name=killed", *extra)
    proc, out = _start(args, tmp_path, "killed")
    procs: list[psutil.Process] = []
    try:
        _wait_for_steps(proc, tmp_path / "killed", out, 3)
        procs = _ranks(proc)
        proc.kill()
        proc.wait(timeout=10)
        t0 = time.monotonic()
        while _alive(procs) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        gone_after = time.monotonic() - t0
    finally:
        survivors = _reap(proc, procs)
    assert survivors == [] and gone_after < 5, f"ranks alive {gone_after:.1f} s after the launcher died"


@pytest.mark.timeout(180)
def test_ctrl_c_in_a_single_process_run_saves_and_prints_one_line(shakespeare_dir, tmp_path):
    args = _overrides(shakespeare_dir, tmp_path, "launcher.nproc=1", "run.name=single", *LONG)
    run_dir = tmp_path / "single"
    proc, out = _start(args, tmp_path, "single")
    try:
        _wait_for_steps(proc, run_dir, out, 3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
    text, last = out.read_text(), _steps(run_dir)[-1]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [last]
    assert _llmtrain_lines(text) == [
        f"llmtrain: stopped by SIGINT; saved {run_dir / 'checkpoints' / f'step_{last:08d}'}: "
        "run the same command to resume from it"
    ]
