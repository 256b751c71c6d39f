"""Fixtures for launcher tests: the local SLURM cluster (skip with the reason when it is not there)
and a tiny, fast training config shared by the SLURM, torchrun and local runs compared here."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# .ci/setup.d/slurm.sh (tools/ci/slurm-local-up.sh) writes the cluster's config here.
LOCAL_SLURM_CONF = Path("/tmp/slurm-local/slurm.conf")

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


def _cluster_problem() -> str | None:
    if "SLURM_CONF" not in os.environ and LOCAL_SLURM_CONF.is_file():
        os.environ["SLURM_CONF"] = str(LOCAL_SLURM_CONF)
    if shutil.which("sinfo") is None:
        return "sinfo not found (run .ci/setup.d/slurm.sh as root to start a local cluster)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s (slurmctld down?)"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    if not {"idle", "mixed", "allocated"} & set(out.stdout.split()):
        return f"no usable SLURM node (states: {out.stdout.split()})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """SLURM_CONF of a responsive cluster, or skip naming what is missing."""
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"SLURM cluster unavailable: {problem}")
    return os.environ.get("SLURM_CONF", "")


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
