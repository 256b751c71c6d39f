"""launcher=torchrun across "nodes": two torchrun agents on loopback (node_rank 0 and 1, one rank each)
form one 2-rank job whose per-step losses equal the 2-process local run, with the static rendezvous
(node_rank fixes the ranks) and the elastic c10d one (ranks in order of arrival)."""

import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain.config import ConfigError
from tests.distributed import free_port
from tests.launch.conftest import STEPS, read_losses


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_two_torchrun_agents_on_loopback(rdzv: str, tiny_overrides, reference_losses, tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    common = [*tiny_overrides, "launcher=torchrun", "launcher.nnodes=2", "launcher.nproc=1"]
    common += [f"launcher.rdzv_backend={rdzv}"]
    common += [f"launcher.rdzv_endpoint={endpoint}", f"run.root={tmp_path}", "run.name=two-nodes"]
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "llmtrain.cli", *common, f"launcher.node_rank={node}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for a in agents:
            outputs.append(a.communicate(timeout=140)[0])
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    if rdzv == "static":
        assert f"--master_addr=127.0.0.1 --master_port={endpoint.rsplit(':')[1]}" in outputs[0]
    else:
        assert all(f"--rdzv_backend=c10d --rdzv_endpoint={endpoint}" in o for o in outputs)
    losses = read_losses(tmp_path / "two-nodes")
    assert sorted(losses) == list(range(1, STEPS + 1))
    worst = max(abs(losses[s] - reference_losses[s]) for s in reference_losses)
    assert worst <= 1e-6, f"max per-step loss difference vs 2 local processes: {worst:.3g}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("launcher.node_rank=2", r"launcher.node_rank=2 must be in \[0, launcher.nnodes=2\)"),
        ("launcher.rdzv_endpoint=node0", "must be host:port of node 0"),
        ("launcher.rdzv_backend=etcd", "rdzv_backend='etcd' is not allowed; choose one of: static, c10d"),
    ],
)
def test_multinode_settings_are_checked(make_config, override: str, message: str) -> None:
    from llmtrain.launch.local import torchrun_command

    cfg = make_config("launcher=torchrun", "launcher.nnodes=2", override)
    with pytest.raises(ConfigError, match=message):
        torchrun_command(cfg, Path("config.yaml"))
