"""Fixtures for launcher tests: the local SLURM cluster (skip with the reason when it is not there)
and a tiny, fast training config shared by the SLURM, torchrun and local runs compared here."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# .ci/setup.d/slurm.sh (tools/ci/slurm-local-up.sh) writes the cluster's config here.
LOCAL_SLURM_CONF = Path("/tmp/slurm-local/slurm.conf")
# ... and tools/ci/slurm-2node-up.sh that of the two-node cluster (nodes n1, n2 on 127.0.0.1).
TWO_NODE_SLURM_CONF = Path("/tmp/slurm-2node/slurm.conf")

# 2 layers, dim 32, seq 32: a step costs milliseconds, so jobs are dominated by process start-up.
TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=2",
    "model.ffn_dim=64",
    "data.seq_len=32",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.val_every=0",
    "trainer.num_threads=1",
]


def _cluster_problem(min_nodes: int = 1) -> str | None:
    """Why the cluster of SLURM_CONF cannot run the tests (fewer than `min_nodes` usable nodes), or None."""
    if "SLURM_CONF" not in os.environ and LOCAL_SLURM_CONF.is_file():
        os.environ["SLURM_CONF"] = str(LOCAL_SLURM_CONF)
    if shutil.which("sinfo") is None:
        return "sinfo not found (run .ci/setup.d/slurm.sh as root to start a local cluster)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s (slurmctld down?)"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    usable = [s for s in out.stdout.split() if s in {"idle", "mixed", "allocated"}]
    if len(usable) < min_nodes:
        return f"fewer than {min_nodes} usable SLURM node(s) (states: {out.stdout.split()})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """SLURM_CONF of a responsive cluster, or skip naming what is missing."""
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"SLURM cluster unavailable: {problem}")
    return os.environ.get("SLURM_CONF", "")


def two_node_cluster_problem() -> str | None:
    """Why the two-node cluster cannot run a job now (None: it can)."""
    if not TWO_NODE_SLURM_CONF.is_file():
        return f"no {TWO_NODE_SLURM_CONF} (.ci/setup.d/slurm.sh)"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(TWO_NODE_SLURM_CONF))
        return _cluster_problem(min_nodes=2)


@pytest.fixture(scope="module")
def slurm_two_nodes() -> Iterator[str]:
    """SLURM_CONF of the two-node cluster (tools/ci/slurm-2node-up.sh), set for the module's tests
    (submitit, sbatch and scontrol read it), or skip naming what is missing."""
    if not TWO_NODE_SLURM_CONF.is_file():
        pytest.skip(f"two-node SLURM cluster unavailable: no {TWO_NODE_SLURM_CONF} (.ci/setup.d/slurm.sh)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(TWO_NODE_SLURM_CONF))
        problem = _cluster_problem(min_nodes=2)
        if problem:
            pytest.skip(f"two-node SLURM cluster unavailable: {problem}")
        yield str(TWO_NODE_SLURM_CONF)


def read_losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses from <run_dir>/train_log.jsonl (the last entry wins for a repeated step)."""
    import json

    out = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            out[e["step"]] = e["loss"]
    return out


STEPS = 200  # long enough (~3 s of training) to interrupt a job mid-run; checkpoints every 100


@pytest.fixture(scope="session")
def tiny_overrides(shakespeare_dir: Path) -> list[str]:
    return [
        *TINY,
        f"data.sources.0.path={shakespeare_dir}",
        "tracking=none",
        f"trainer.max_steps={STEPS}",
        "checkpoint.every_steps=100",
        "trainer.log_every=100",
    ]


@pytest.fixture(scope="session")
def reference_losses(tiny_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Per-step losses of the uninterrupted run on 2 local processes (torchrun, gloo)."""
    from llmtrain.launch.local import launch_local
    from llmtrain.testing import compose_config

    root = tmp_path_factory.mktemp("reference")
    cfg = compose_config([*tiny_overrides, "launcher.nproc=2", f"run.root={root}", "run.name=ref"])
    assert launch_local(cfg) == 0
    losses = read_losses(root / "ref")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses
