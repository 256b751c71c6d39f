"""A real `mlflow server` on 127.0.0.1 (sqlite backend) that tests can stop and restart, and a
Trainer that runs test hooks at chosen steps (to cut the server mid-run or simulate a crash)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from llmtrain.distributed.env import DistEnv
from llmtrain.launch.local import free_port
from llmtrain.train.trainer import Trainer

ENV = DistEnv(0, 0, 1, 1)
TINY = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64",
    "data.seq_len=32", "trainer.micro_batch_size=4", "trainer.global_batch_size=4", "trainer.log_every=1",
    "trainer.val_every=0", "trainer.val_batches=1", "trainer.num_threads=1",
    "tracking=mlflow", "tracking.flush_every_s=0.1", "tracking.system_metrics_every_s=0.05",
]  # fmt: skip


class MlflowServer:
    """`mlflow server` with one worker and job execution off (2 processes, ~0.4 GB, healthy in ~5 s)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.proc: subprocess.Popen | None = None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 90.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts")]  # fmt: skip
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 - kept open for the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout} s")

    def stop(self) -> None:
        """Kill the server like a crash or a lost node would (sqlite has committed every request)."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server_process(tmp_path_factory: pytest.TempPathFactory):
    """One server per module, started on first need (each start costs ~5 s of the test budget)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), free_port())
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(mlflow_server_process: MlflowServer) -> MlflowServer:
    """The module's server, running."""
    if mlflow_server_process.proc is None:
        mlflow_server_process.start()
    return mlflow_server_process


class HookedTrainer(Trainer):
    """The real Trainer; `hooks[step](trainer)` runs right after that step was recorded."""

    hooks: dict[int, Callable[[Trainer], None]]

    def record(self, *args: float) -> None:
        super().record(*args)
        hook = getattr(self, "hooks", {}).get(self.step)
        if hook:
            hook(self)


def train_log(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
