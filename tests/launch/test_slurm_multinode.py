"""The SLURM launcher on a real two-node cluster (tools/ci/slurm-2node-up.sh: nodes n1, n2 whose names
do not resolve, NodeAddr 127.0.0.1): the rendezvous host comes from NodeAddr, tensor-parallel peers
share a node while data parallel spans both, losses equal the single-node run of the same layout, a
preempted two-node job resumes in one MLflow run, and a task killed on one node ends the job naming it.

Each SLURM job costs tens of seconds, so each test is one job that checks several things.
"""

import os
import re
import signal
import time
from pathlib import Path

import pytest

from llmtrain.launch.rendezvous import rendezvous_port
from llmtrain.launch.runs import wait_for_state
from tests.launch.conftest import STEPS, read_losses
from tests.launch.test_slurm import (
    _assert_one_mlflow_run,
    _assert_same_losses,
    _log,
    _scontrol,
    _wait_for_steps,
)

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]
TP_STEPS = 30


def _submit(overrides: list[str], root: Path, name: str, nproc: int):
    from llmtrain.launch.slurm import submit_job
    from llmtrain.testing import compose_config

    job = [
        "launcher=slurm",
        "launcher.nodes=2",
        f"launcher.nproc={nproc}",
        "launcher.time_min=10",
        "launcher.signal_delay_s=60",
        "launcher.rdzv_timeout_s=60",
    ]
    return submit_job(compose_config([*overrides, *job, f"run.root={root}", f"run.name={name}"]))


def _with(overrides: list[str], **values: object) -> list[str]:
    """`overrides` with the given keys (dots as __) replaced: Hydra refuses a key given twice."""
    keys = {k.replace("__", "."): v for k, v in values.items()}
    return [o for o in overrides if o.split("=")[0] not in keys] + [f"{k}={v}" for k, v in keys.items()]


def _rank_nodes(job, world: int) -> dict[int, str]:
    """Each rank's node, from the line every task logs at start (its own log file)."""
    nodes = {}
    for rank in range(world):
        text = (job.paths.folder / f"{job.job_id}_{rank}_log.err").read_text()
        nodes[rank] = re.search(rf"SLURM job {job.job_id}, allocation \d+, node (\S+),", text).group(1)
    return nodes


@pytest.mark.timeout(240)
def test_two_nodes_tp_inside_a_node_dp_across(slurm_two_nodes, tiny_overrides, tmp_path) -> None:
    from llmtrain.launch.local import launch_local
    from llmtrain.parallel.dims import ParallelDims
    from llmtrain.testing import compose_config

    overrides = [
        *_with(tiny_overrides, trainer__max_steps=TP_STEPS, checkpoint__every_steps=0),
        "parallel=tp2",
    ]
    job = _submit(overrides, tmp_path, "tp2", nproc=2)
    local = compose_config([*overrides, "launcher.nproc=4", f"run.root={tmp_path}", "run.name=local"])
    assert launch_local(local) == 0  # the same layout on one node, while the job queues and runs
    assert wait_for_state(job.job_id, timeout_s=180) == "COMPLETED", _log(job)[-3000:]
    assert _scontrol(job.job_id)["NodeList"] == "n[1-2]"
    _assert_same_losses(read_losses(tmp_path / "tp2"), read_losses(tmp_path / "local"))
    # n1's NodeAddr: the name n1 does not resolve here
    assert f"rendezvous 127.0.0.1:{rendezvous_port(job.job_id)}" in _log(job)
    nodes = _rank_nodes(job, 4)
    dims = ParallelDims(dp_replicate=-1, dp_shard=1, tp=2, pp=1, world_size=4)
    coords = {r: dims.coords(r) for r in nodes}
    for a in nodes:
        for b in nodes:
            if a != b and coords[a]["dp"] == coords[b]["dp"]:  # tp peers
                assert nodes[a] == nodes[b], (nodes, coords)
            if a != b and coords[a]["tp"] == coords[b]["tp"]:  # dp peers
                assert nodes[a] != nodes[b], (nodes, coords)


@pytest.mark.timeout(240)
def test_preempted_two_node_job_resumes_in_one_mlflow_run(
    slurm_two_nodes, tiny_overrides, reference_losses, tmp_path
) -> None:
    overrides = [
        *_with(tiny_overrides, tracking="mlflow", trainer__log_every=10),
        "tracking.system_metrics=false",
    ]
    job = _submit(overrides, tmp_path, "preempted", nproc=1)
    run_dir = tmp_path / "preempted"
    _wait_for_steps(job, run_dir, 20)
    job._interrupt()  # preemption: SIGTERM then USR2 to every task; rank 0 runs scontrol requeue
    assert wait_for_state(job.job_id, timeout_s=200) == "COMPLETED", _log(job)[-3000:]
    assert _scontrol(job.job_id)["Restarts"] == "1"
    result = job.results()[0]
    first = result["history"][0]["step"]
    assert result["status"] == "FINISHED" and 20 < first <= STEPS, first
    stop_ckpt = run_dir / "checkpoints" / f"step_{first - 1:08d}"
    text = _log(job)
    assert "requeueing SLURM job" in text  # rank 0 of the first allocation
    assert re.search(rf"resum.* {re.escape(str(stop_ckpt))}", text)  # from where it stopped
    assert sorted(set(_rank_nodes(job, 2).values())) == ["n1", "n2"]
    _assert_same_losses(read_losses(run_dir), reference_losses)  # = 2 local processes, uninterrupted
    _assert_one_mlflow_run(tmp_path, reference_losses, job.job_id)


def _task_pid(job_id: str, rank: int) -> int | None:
    """The pid of the job's task `rank` (all "nodes" of the test cluster are this machine)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if want <= env and b"submitit" in cmd:
            return int(pid)
    return None


@pytest.mark.timeout(150)
def test_task_killed_on_one_node_ends_the_job_naming_it(slurm_two_nodes, tiny_overrides, tmp_path) -> None:
    overrides = _with(tiny_overrides, trainer__max_steps=1000000, checkpoint__every_steps=0)
    job = _submit(overrides, tmp_path, "killed", nproc=1)
    _wait_for_steps(job, tmp_path / "killed", 5)
    pid = _task_pid(job.job_id, 1)
    assert pid is not None, "no process of task 1"
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    assert wait_for_state(job.job_id, timeout_s=90) == "FAILED"
    took = time.monotonic() - killed_at
    text = _log(job)
    assert re.search(r"n2: task 1: Killed", text), text[-3000:]
    assert took < 60, f"the job took {took:.0f}s to end after its task died"
