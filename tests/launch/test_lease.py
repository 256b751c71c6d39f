"""The run-folder lease (llmtrain/launch/lease.py) with real processes: a live holder refuses, a dead
or silent one is taken over with a warning, a requeued SLURM job takes over its own, and of several
processes racing for one folder exactly one wins."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from llmtrain.launch import lease as lease_mod
from llmtrain.launch.lease import Holder, LeaseHeld, acquire, check_free, read_holder

ROOT = Path(__file__).resolve().parents[2]


def _write_lease(run_dir: Path, **fields) -> Holder:
    now = time.time()
    base = dict(host=socket.gethostname(), pid=0, pid_started=0.0, slurm_job_id="", since=now - 60)
    holder = Holder(**{**base, "heartbeat": now, "token": "other", **fields})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".lease").write_text(json.dumps(asdict(holder)))
    return holder


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_on_this_host_refuses_naming_itself(tmp_path, sleeper):
    _write_lease(tmp_path, pid=sleeper.pid, pid_started=psutil.Process(sleeper.pid).create_time())
    with pytest.raises(LeaseHeld, match=rf"{tmp_path} is in use by pid {sleeper.pid} on host .*, since 20"):
        acquire(tmp_path)
    with pytest.raises(LeaseHeld):
        check_free(tmp_path)
    assert read_holder(tmp_path).token == "other"  # untouched


def test_a_dead_pid_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(done.stdout)
    _write_lease(tmp_path, pid=dead, pid_started=123.0)
    with caplog.at_level(logging.WARNING, logger="llmtrain"):
        lease = acquire(tmp_path)
    try:
        assert read_holder(tmp_path).pid == os.getpid()
        assert (
            f"taking over the stale lease of pid {dead}" in caplog.text and "no longer running" in caplog.text
        )
    finally:
        lease.release()
    assert not (tmp_path / ".lease").exists()


def test_a_reused_pid_is_not_the_holder(tmp_path, sleeper):
    _write_lease(tmp_path, pid=sleeper.pid, pid_started=psutil.Process(sleeper.pid).create_time() - 3600)
    acquire(tmp_path).release()  # same pid, another process: stale


def test_another_host_is_live_while_it_beats_and_stale_after(tmp_path, caplog):
    _write_lease(tmp_path, host="node-b", pid=1, heartbeat=time.time() - 10)
    with pytest.raises(LeaseHeld, match="pid 1 on host node-b"):
        acquire(tmp_path)
    _write_lease(tmp_path, host="node-b", pid=1, heartbeat=time.time() - lease_mod.STALE_AFTER_S - 5)
    with caplog.at_level(logging.WARNING, logger="llmtrain"):
        lease = acquire(tmp_path)
    lease.release()
    assert "no heartbeat from host node-b for 9" in caplog.text


def test_a_requeued_slurm_job_takes_over_its_own_lease(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lease(tmp_path, host="node-b", pid=1, slurm_job_id="4242")
    with caplog.at_level(logging.WARNING, logger="llmtrain"):
        lease = acquire(tmp_path)
    holder = read_holder(tmp_path)
    lease.release()
    assert (holder.pid, holder.slurm_job_id) == (os.getpid(), "4242") and "stale" not in caplog.text


def test_the_heartbeat_advances_and_a_lost_lease_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.05)
    lease = acquire(tmp_path)
    first = read_holder(tmp_path).heartbeat
    time.sleep(0.5)
    assert read_holder(tmp_path).heartbeat > first
    _write_lease(tmp_path, host="node-b", pid=1)  # taken over elsewhere (e.g. after a partition)
    time.sleep(0.3)
    lease.release()  # must not remove the new holder's lease
    assert read_holder(tmp_path).host == "node-b"


RACER = """
import sys, time
from pathlib import Path
from llmtrain.launch.lease import LeaseHeld, acquire
while time.time() < float(sys.argv[2]):
    pass
try:
    acquire(Path(sys.argv[1]))
except LeaseHeld:
    sys.exit(2)
time.sleep(1.5)
"""


def test_of_four_processes_racing_exactly_one_gets_the_lease(tmp_path):
    start = str(time.time() + 3)  # all four are spinning on the same instant when it comes
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), start], env=env) for _ in range(4)
    ]
    codes = sorted(p.wait(timeout=30) for p in racers)
    assert codes == [0, 2, 2, 2]
