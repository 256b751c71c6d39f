"""The SLURM launcher against a real single-node cluster (.ci/setup.d/slurm.sh): train, preempt ->
checkpoint -> requeue -> resume, cancel, sweep, and bad input refused before submission.

Every job trains the same tiny config on 2 CPU tasks; its per-step losses must equal those of the
same config run locally on 2 processes (`reference_losses`), interrupted or not.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtrain.checkpoint import list_checkpoints
from llmtrain.launch.runs import ACTIVE_STATES, job_records, job_states, wait_for_state
from tests.launch.conftest import STEPS, TINY, read_losses, two_node_cluster_problem

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]
ROOT = Path(__file__).resolve().parents[2]
SLURM_JOB = ["launcher=slurm", "launcher.nproc=2", "launcher.time_min=10", "launcher.signal_delay_s=60"]


def _submit(overrides: list[str], root: Path, name: str):
    from llmtrain.launch.slurm import submit_job
    from llmtrain.testing import compose_config

    return submit_job(compose_config([*overrides, *SLURM_JOB, f"run.root={root}", f"run.name={name}"]))


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20
    )
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def _wait_for_steps(job, run_dir: Path, n: int, timeout_s: float = 90.0) -> None:
    """Wait until the job has logged n steps; fail at once (with its log) if it ended before."""
    log = run_dir / "train_log.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= n:
            return
        state = job_states([job.job_id])[job.job_id]
        if state not in ACTIVE_STATES | {"UNKNOWN"}:
            raise AssertionError(f"job {job.job_id} ended ({state}) before step {n}:\n{_log(job)[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{log} has fewer than {n} steps after {timeout_s:.0f}s")


def _log(job) -> str:
    """Rank 0's stderr (all allocations of the job: submitit opens logs in append mode)."""
    return Path(str(job.paths.stderr).replace("%t", "0")).read_text()


def _assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= 1e-6, f"max per-step loss difference {worst:.3g}"


@pytest.mark.timeout(150)
def test_two_task_job_matches_local_run(slurm_cluster, tiny_overrides, reference_losses, tmp_path) -> None:
    job = _submit(tiny_overrides, tmp_path, "plain")
    assert wait_for_state(job.job_id, timeout_s=120) == "COMPLETED", job.stderr()
    result = job.results()[0]
    assert result["status"] == "FINISHED" and result["step"] == STEPS
    _assert_same_losses(read_losses(tmp_path / "plain"), reference_losses)
    assert _scontrol(job.job_id)["NumTasks"] == "2"


@pytest.mark.timeout(180)
def test_preempted_job_checkpoints_requeues_and_resumes(
    slurm_cluster, tiny_overrides, reference_losses, tmp_path
) -> None:
    # the two-node variant (test_slurm_multinode.py) asserts all of this and more: run this one only
    # where that cluster is down, so that a preemption is always tested once (and only once)
    if two_node_cluster_problem() is None:
        pytest.skip(
            "covered by test_slurm_multinode.py::test_preempted_two_node_job_resumes_in_one_mlflow_run"
        )
    # with MLflow (a sqlite store beside the runs): the second allocation must continue the same run
    swap = {"tracking=none": "tracking=mlflow", "trainer.log_every=100": "trainer.log_every=10"}
    overrides = [swap.get(o, o) for o in tiny_overrides] + ["tracking.system_metrics=false"]
    job = _submit(overrides, tmp_path, "preempted")
    run_dir = tmp_path / "preempted"
    _wait_for_steps(job, run_dir, 20)
    job._interrupt()  # what SLURM does on preemption: SIGTERM, then the USR2 warning, to every task
    assert wait_for_state(job.job_id, timeout_s=150) == "COMPLETED", job.stderr()
    assert _scontrol(job.job_id)["Restarts"] == "1"
    result = job.results()[0]  # from the second allocation: it resumed past the interruption
    first = result["history"][0]["step"]
    assert result["status"] == "FINISHED" and 20 < first <= STEPS, first
    text = _log(job)
    assert "requeueing SLURM job" in text  # rank 0 of the first allocation
    stop_ckpt = run_dir / "checkpoints" / f"step_{first - 1:08d}"
    assert re.search(rf"resum.* {re.escape(str(stop_ckpt))}", text), text  # loaded the stop checkpoint
    _assert_same_losses(read_losses(run_dir), reference_losses)
    _assert_one_mlflow_run(tmp_path, reference_losses, job.job_id)


def _assert_one_mlflow_run(root: Path, reference: dict[int, float], job_id: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llmtrain").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("slurm_job_id") == job_id
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(history) == list(range(10, STEPS + 1, 10))  # both allocations, no step twice
    assert max(abs(history[s] - reference[s]) for s in history) <= 1e-6


@pytest.mark.timeout(120)
def test_cancel_stops_the_job_after_saving(slurm_cluster, tiny_overrides, tmp_path) -> None:
    long = [o for o in tiny_overrides if not o.startswith(("trainer.max_steps", "checkpoint.every_steps"))]
    job = _submit([*long, "trainer.max_steps=1000000", "checkpoint.every_steps=0"], tmp_path, "cancelled")
    run_dir = tmp_path / "cancelled"
    _wait_for_steps(job, run_dir, 5)
    tool = [sys.executable, str(ROOT / "tools" / "runs.py")]
    out = subprocess.run([*tool, "cancel", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"cancelled {job.job_id}" in out.stdout, out.stderr
    assert wait_for_state(job.job_id, timeout_s=60) == "CANCELLED"
    time.sleep(2)  # a requeue would show up as PENDING/REQUEUED by now
    assert job_states([job.job_id])[job.job_id] == "CANCELLED"
    assert _scontrol(job.job_id)["Restarts"] == "0"
    st = json.loads(
        subprocess.run(
            [*tool, "status", str(run_dir), "--json"], capture_output=True, text=True, timeout=60
        ).stdout
    )
    assert st["state"] == "CANCELLED" and st["job_id"] == job.job_id
    # SIGTERM reached the trainer: it stopped at a step boundary and saved there
    assert st["checkpoint_step"] is not None and st["checkpoint_step"] >= 5


@pytest.mark.timeout(120)
def test_requeues_are_bounded_by_max_requeues(slurm_cluster, tiny_overrides, tmp_path) -> None:
    long = [o for o in tiny_overrides if not o.startswith(("trainer.max_steps", "checkpoint.every_steps"))]
    overrides = [*long, "trainer.max_steps=1000000", "checkpoint.every_steps=0", "launcher.max_requeues=0"]
    job = _submit(overrides, tmp_path, "bounded")
    run_dir = tmp_path / "bounded"
    _wait_for_steps(job, run_dir, 5)
    job._interrupt(timeout=True)  # the pre-timeout USR2 alone, as SLURM sends it before the limit
    assert wait_for_state(job.job_id, timeout_s=60) == "FAILED"
    assert _scontrol(job.job_id)["Restarts"] == "0"
    assert "is not requeued: launcher.max_requeues=0 reached" in _log(job)
    last = max(read_losses(run_dir))
    assert last in [step for step, _ in list_checkpoints(run_dir / "checkpoints")]  # saved where it stopped


@pytest.mark.timeout(150)
def test_sweep_submits_one_job_array(slurm_cluster, shakespeare_dir, tmp_path) -> None:
    args = [
        *TINY,
        f"data.sources.0.path={shakespeare_dir}",
        "tracking=none",
        "trainer.max_steps=16",
        "checkpoint.every_steps=8",
        "launcher=slurm",
        "launcher.nproc=1",
        "launcher.time_min=10",
        "launcher.signal_delay_s=60",
        f"run.root={tmp_path}",
        "run.name=sw",
        "optim.lr=0.001,0.003",
    ]
    cli = [sys.executable, "-m", "llmtrain.cli", "-m", *args]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.name.startswith("sw-"))
    assert [p.name for p in runs] == ["sw-optim.lr=0.001", "sw-optim.lr=0.003"], out.stdout
    recs = [job_records(r)[-1] for r in runs]
    assert recs[0].sweep and recs[0].sweep == recs[1].sweep
    array = recs[0].job_id.split("_")[0]  # one sbatch: a job array with a task per member
    assert [r.job_id for r in recs] == [f"{array}_0", f"{array}_1"], out.stdout
    assert _scontrol(recs[0].job_id).get("ArrayJobId") == array
    for r in recs:
        assert wait_for_state(r.job_id, timeout_s=100) == "COMPLETED", Path(r.stderr).read_text()[-3000:]
    losses = [read_losses(r) for r in runs]
    assert sorted(losses[0]) == sorted(losses[1]) == list(range(1, 17))
    assert losses[0][1] == losses[1][1]  # same init and data: step 1 is computed before any update
    assert losses[0][16] != losses[1][16]  # different learning rates after that
    listing = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "runs.py"),
            "list",
            "--root",
            str(tmp_path),
            "--sweep",
            recs[0].sweep,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.splitlines()
    assert len(listing) == 3 and all("COMPLETED" in ln and "16/16" in ln for ln in listing[1:]), listing


@pytest.mark.timeout(90)
def test_bad_input_is_refused_before_submission(slurm_cluster, shakespeare_dir, tmp_path) -> None:
    from llmtrain.config import ConfigError

    base = [*TINY, f"data.sources.0.path={shakespeare_dir}", "tracking=none"]
    cli = [
        sys.executable,
        "-m",
        "llmtrain.cli",
        *base,
        "launcher=slurm",
        f"run.root={tmp_path}",
        "launcher.gpus_per_node=2",
    ]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2
    assert "launcher.gpus_per_node=2 but the nodes of partition 'debug' have at most 0 GPU(s)" in out.stderr
    with pytest.raises(ConfigError, match=r"launcher.partition='gpu' does not exist; choose one of: debug"):
        _submit([*base, "launcher.partition=gpu"], tmp_path, "nopart")
    with pytest.raises(
        ConfigError, match=r"launcher.time_min=10 is shorter than checkpoint.every_minutes=30"
    ):
        _submit([*base, "checkpoint.every_minutes=30", "launcher.partition=debug"], tmp_path, "short")
    assert not list(tmp_path.glob("*/slurm/jobs.jsonl"))  # nothing was submitted


def test_submission_is_refused_while_a_local_run_holds_the_folder(
    slurm_cluster, tiny_overrides, tmp_path
) -> None:
    from llmtrain.launch.lease import LeaseHeld, hold

    run_dir = tmp_path / "busy"
    with hold(run_dir), pytest.raises(LeaseHeld, match=rf"{run_dir} is in use by pid {os.getpid()} on host"):
        _submit(tiny_overrides, tmp_path, "busy")
    assert sorted(p.name for p in run_dir.iterdir()) == []  # nothing written, nothing submitted
