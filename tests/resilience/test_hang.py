"""Hangs and crashes end to end through `llmtrain` (2 gloo ranks, real processes, docs/resilience.md).

One run meets a hang, then a crash, then finishes: on the first attempt rank 1 SIGSTOPs itself mid-step
and rank 0's watchdog fires within its deadline, dumps its stacks (stuck in the step), names rank 1 by
its stale heartbeat, logs it (console, events.jsonl, MLflow) and exits 75; the launcher restarts both
ranks from the step-2 checkpoint, where rank 1 is SIGKILLed mid-step; the second restart finishes with
the loss trace of the uninterrupted run, bitwise, in the same MLflow run. A second run whose rank 1
exits at the first step on every attempt ends after crash_loop_after tries with the reason and 76.
"""

import json
from pathlib import Path

import pytest

from llmtrain.launch.restart import CRASH_LOOP_EXIT_CODE
from llmtrain.resilience import HANG_EXIT_CODE
from tests.test_cli import TINY, _cli

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]

RUN = [*TINY, "launcher.nproc=2", "trainer.max_steps=4", "checkpoint.every_steps=2"]
RUN += ["trainer.log_every=1", "trainer.val_every=0"]
FAST_WATCHDOG = [
    "resilience.hang_min_s=3", "resilience.hang_factor=2", "resilience.hang_warmup_steps=1",
    "resilience.heartbeat_s=0.5", "resilience.hang_startup_s=60", "resilience.max_restarts=3",
    "resilience.crash_loop_after=3",
]  # fmt: skip


def _run(root: Path, data: Path, name: str, *extra: str):
    args = [*RUN, f"data.sources.0.path={data}", f"run.root={root}", f"run.name={name}", *extra]
    return _cli(args, root, timeout=600)


def _trace(run_dir: Path) -> list[tuple[int, float, float]]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"], e["grad_norm"]) for e in map(json.loads, lines)]


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hang")


@pytest.fixture(scope="module")
def reference(root, shakespeare_dir) -> list[tuple[int, float, float]]:
    """The uninterrupted 2-rank run's (step, loss, grad norm) trace."""
    out = _run(root, shakespeare_dir, "ref", "tracking=none")
    assert out.returncode == 0, out.stderr[-3000:]
    trace = _trace(root / "ref")
    assert [s for s, _, _ in trace] == [1, 2, 3, 4]
    return trace


def test_hang_then_crash_restart_in_job_and_finish_exactly(root, shakespeare_dir, reference):
    fault = ["resilience.inject_fault=[sigstop,sigkill]", "resilience.inject_fault_step=2"]
    out = _run(root, shakespeare_dir, "stop", *FAST_WATCHDOG, *fault)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    run_dir = root / "stop"
    assert _trace(run_dir) == reference  # restarted twice from step 2: the same trace, bitwise
    assert "hang watchdog on rank 0: no progress for" in text
    assert "ranks that stopped reporting: 1 (last heartbeat at step" in text
    assert f"exited with code {HANG_EXIT_CODE}" in text and "rank 1 was killed by SIGKILL" in text
    assert "step_00000002 (restart 1 of 3)" in text and "step_00000002 (restart 2 of 3)" in text
    hang, *restarts = _events(run_dir)
    assert (hang["kind"], hang["step"], hang["details"]["stale_ranks"]) == ("hang", 2, [1])
    d = hang["details"]
    assert 3.0 <= d["deadline_s"] <= d["waited_s"] <= d["deadline_s"] + 1.0  # fired within a tick (0.5 s)
    got = [(e["kind"], e["details"]["exit_code"], e["details"]["failed_step"]) for e in restarts]
    assert got == [("restart", HANG_EXIT_CODE, 3), ("restart", 1, 3)]
    # rank 0's dump shows where it waited: inside the training step, on the stopped peer
    stacks = (Path(d["diagnostics"]) / "rank0.txt").read_text()
    assert "in train_step" in stacks and "llmtrain/parallel/step.py" in stacks, stacks[-3000:]
    assert "NCCL Flight Recorder: skipped (backend gloo" in stacks
    _check_one_mlflow_run(root, run_dir)
    # the ranks were forks of the launcher's warm server (launch/warm.py: no re-imports); a start is
    # recorded at its first step, which the attempt killed in its first step never reached
    starts = [json.loads(x) for x in (run_dir / "starts.jsonl").read_text().splitlines()]
    assert [(s["step"], s["forked"]) for s in starts] == [(0, True), (2, True)], starts


def _check_one_mlflow_run(root: Path, run_dir: Path) -> None:
    """One MLflow run across the restart: the hang counted and named, training logged to the end."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llmtrain").experiment_id])
    (run,) = [r for r in runs if r.info.run_name == run_dir.name]
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "resilience/hangs")] == [1.0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert "hang watchdog on rank 0" in run.data.tags["resilience.hang.step_2"]


def test_a_step_that_always_fails_ends_as_a_crash_loop(root, shakespeare_dir):
    fault = ["resilience.inject_fault=[exit,exit,exit,exit]", "resilience.inject_fault_step=0"]
    budget = ["resilience.max_restarts=3", "resilience.crash_loop_after=2", "checkpoint.enabled=false"]
    out = _run(root, shakespeare_dir, "loop", "tracking=none", *fault, *budget)
    text = out.stdout + out.stderr
    assert out.returncode == CRASH_LOOP_EXIT_CODE, text[-4000:]
    assert "restarting all ranks from scratch (no checkpoint yet) (restart 1 of 3)" in text
    assert "llmtrain: crash loop: step 1 failed 2 times in a row (resilience.crash_loop_after=2)" in text
    kinds = [(e["kind"], e["action"], e["details"]["failed_step"]) for e in _events(root / "loop")]
    assert kinds == [("restart", "restart", 1), ("crash_loop", "stop", 1)]
