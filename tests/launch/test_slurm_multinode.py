"""The SLURM launcher on a real two-node cluster (tools/ci/slurm-2node-up.sh: nodes n1, n2 whose names
do not resolve, NodeAddr 127.0.0.1): the rendezvous host comes from NodeAddr, tensor-parallel peers
share a node while data parallel spans both, losses equal the single-node run of the same layout, a
preempted two-node job resumes in one MLflow run, and a task killed on one node ends the job naming it.

Each SLURM job costs tens of seconds, so each test is one job that checks several things.
"""

import re
from pathlib import Path

import pytest

from llmtrain.launch.rendezvous import rendezvous_port
from llmtrain.launch.runs import wait_for_state
from tests.launch.conftest import read_losses
from tests.launch.test_slurm import _assert_same_losses, _log, _scontrol

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
