"""In-job restart on the real one-node SLURM cluster (resilience.max_restarts > 0: one node agent
task runs the ranks and restarts them inside the allocation, launch/slurm_agent.py).

One job has rank 1 SIGKILLed mid-step (step 151, checkpoints every 100): it completes in the same
allocation (one job id in sacct, never requeued), with the loss trace of the uninterrupted local run
bitwise, one MLflow run and a `restart` event. A second job whose rank 1 exits at the first step on
every attempt stops as a crash loop: exit code 76 in sacct, the reason in its log and events.
Both are submitted at once (they queue on the 2-CPU node), so the test waits for them together. On
the two-node cluster a rank killed on n2 restarts the ranks of both nodes (node 0 decides).
"""

import json
import subprocess
from pathlib import Path

import pytest

from llmtrain.launch.restart import CRASH_LOOP_EXIT_CODE
from llmtrain.launch.runs import job_records, wait_for_state
from tests.launch.conftest import STEPS, read_losses
from tests.launch.test_slurm import _assert_one_mlflow_run, _log, _scontrol, _submit

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]


def _sacct(job_id: str) -> list[tuple[str, str, str]]:
    """(job id, state, exit code) of the job's allocations (-X: not its steps; -D: requeued ones too)."""
    out = subprocess.run(
        ["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return [tuple(line.split("|")) for line in out.stdout.split()]  # type: ignore[misc]


def _events(run_dir: Path) -> list[dict]:
    """The restart decisions in events.jsonl (a loaded machine may add straggler warnings)."""
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["kind"] != "straggler"]


@pytest.mark.timeout(300)
def test_killed_rank_restarts_inside_the_allocation(
    slurm_cluster, tiny_overrides, reference_losses, tmp_path
) -> None:
    swap = {"tracking=none": "tracking=mlflow", "trainer.log_every=100": "trainer.log_every=10"}
    tracked = [swap.get(o, o) for o in tiny_overrides] + ["tracking.system_metrics=false"]
    kill = ["resilience.inject_fault=[sigkill]", "resilience.inject_fault_step=150"]
    job = _submit([*tracked, "resilience.max_restarts=2", *kill], tmp_path, "killed")
    short = [o for o in tiny_overrides if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=4"]
    loop = ["resilience.inject_fault=[exit,exit,exit]", "resilience.inject_fault_step=0"]
    budget = ["resilience.max_restarts=3", "resilience.crash_loop_after=2", "checkpoint.enabled=false"]
    budget += ["launcher.max_requeues=0"]
    looping = _submit([*short, *loop, *budget], tmp_path / "loop", "loop")

    assert wait_for_state(job.job_id, timeout_s=240) == "COMPLETED", _log(job)[-4000:]
    run_dir, text = tmp_path / "killed", _log(job)
    assert _sacct(job.job_id) == [(job.job_id, "COMPLETED", "0:0")]  # one allocation, not requeued
    assert _scontrol(job.job_id)["Restarts"] == "0" and _scontrol(job.job_id)["NumTasks"] == "1"
    assert [r.job_id for r in job_records(run_dir)] == [job.job_id]
    assert job.results()[0] == {"status": "FINISHED", "step": STEPS, "restarts": 1}
    assert "rank 1 was killed by SIGKILL" in text, text[-4000:]
    assert f"restarting all ranks from {run_dir}/checkpoints/step_00000100 (restart 1 of 2)" in text
    assert read_losses(run_dir) == reference_losses  # bitwise: the same trace as without the kill
    restart = [(e["kind"], e["details"]["exit_code"], e["details"]["failed_step"]) for e in _events(run_dir)]
    assert restart == [("restart", 1, 151)]
    _assert_one_mlflow_run(tmp_path, reference_losses, job.job_id)

    assert wait_for_state(looping.job_id, timeout_s=180) == "FAILED", _log(looping)[-4000:]
    assert _sacct(looping.job_id) == [(looping.job_id, "FAILED", f"{CRASH_LOOP_EXIT_CODE}:0")]
    reason = "crash loop: step 1 failed 2 times in a row (resilience.crash_loop_after=2); not restarting"
    assert f"llmtrain: {reason}" in _log(looping)
    with pytest.raises(Exception, match="crash loop: step 1 failed 2 times"):
        looping.results()
    kinds = [(e["kind"], e["action"]) for e in _events(tmp_path / "loop" / "loop")]
    assert kinds == [("restart", "restart"), ("crash_loop", "stop")]


@pytest.mark.timeout(300)
def test_killed_rank_on_the_second_node_restarts_both_nodes(
    slurm_two_nodes, tiny_overrides, reference_losses, tmp_path
) -> None:
    from llmtrain.launch.slurm import submit_job
    from llmtrain.testing import compose_config

    job_args = ["launcher=slurm", "launcher.nodes=2", "launcher.nproc=1", "launcher.time_min=10"]
    job_args += ["launcher.signal_delay_s=60", "launcher.rdzv_timeout_s=60", "resilience.max_restarts=2"]
    kill = ["resilience.inject_fault=[sigkill]", "resilience.inject_fault_step=150"]  # rank 1: on n2
    cfg = compose_config([*tiny_overrides, *job_args, *kill, f"run.root={tmp_path}", "run.name=two"])
    job = submit_job(cfg)
    assert wait_for_state(job.job_id, timeout_s=240) == "COMPLETED", _log(job)[-4000:]
    assert _scontrol(job.job_id)["Restarts"] == "0"  # this cluster has no accounting (sacct)
    assert job.results()[0] == {"status": "FINISHED", "step": STEPS, "restarts": 1}
    n2 = (job.paths.folder / f"{job.job_id}_1_log.err").read_text()  # node agent 1's own log
    assert "node n2: node agent 1 of 2" in n2 and "rank 1 was killed by SIGKILL" in n2, n2[-3000:]
    assert "(restart 1 of 2)" in n2 and "(restart 1 of 2)" in _log(job)  # both nodes restarted
    assert read_losses(tmp_path / "two") == reference_losses
