"""Local launcher: run in this process (nproc=1) or spawn nproc ranks with torchrun (gloo on CPU)."""

import fcntl
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from llmtrain.config import Config, save_config
from llmtrain.data import ensure_prepared

log = logging.getLogger("llmtrain")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_run(cfg: Config) -> Path:
    """Everything done once before ranks start: run folder, resolved config, first-use tokenization.

    Safe to call from every rank at once: a file lock serialises it and each step is idempotent.
    """
    run_dir = Path(cfg.run.root) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        save_config(cfg, run_dir / "config.yaml")
        ensure_prepared(cfg.data)
    return run_dir


def run_as_rank(cfg: Config) -> int:
    """Hydra main executed by each rank of a user-started torchrun/srun: prepare, then train here."""
    from llmtrain.launch.worker import main as worker_main

    run_dir = prepare_run(cfg)
    worker_main([str(run_dir / "config.yaml")])  # exits the process
    return 0


def check_multinode(cfg: Config) -> None:
    """launcher=torchrun with nnodes > 1: the same command runs on every node with its node_rank."""
    from llmtrain.config import ConfigError

    lc = cfg.launcher
    if lc.rdzv_backend not in ("static", "c10d"):
        raise ConfigError(
            f"launcher.rdzv_backend={lc.rdzv_backend!r} is not allowed; choose one of: static, c10d"
        )
    if not 0 <= lc.node_rank < lc.nnodes:
        raise ConfigError(f"launcher.node_rank={lc.node_rank} must be in [0, launcher.nnodes={lc.nnodes})")
    host, _, port = lc.rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"launcher.rdzv_endpoint={lc.rdzv_endpoint!r} must be host:port of node 0")


def torchrun_command(cfg: Config, config_path: Path) -> list[str]:
    """torchrun argv for local (single node, free port) or multi-node (rendezvous endpoint) use."""
    lc = cfg.launcher
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={lc.nproc}"]
    if lc.name == "torchrun" and lc.nnodes > 1:
        check_multinode(cfg)
        cmd += [f"--nnodes={lc.nnodes}", f"--node_rank={lc.node_rank}"]
        if lc.rdzv_backend == "static":  # classic: node_rank fixes the ranks, node 0 hosts the store
            host, port = lc.rdzv_endpoint.rsplit(":", 1)
            cmd += [f"--master_addr={host}", f"--master_port={port}"]
        else:  # elastic: ranks in order of arrival; node_rank is ignored by torchrun
            cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={lc.rdzv_endpoint}", f"--rdzv_id={cfg.run.name}"]
    else:
        cmd += ["--standalone" if lc.name == "torchrun" else f"--master_port={free_port()}"]
        if lc.name != "torchrun":
            cmd += ["--master_addr=127.0.0.1", "--nnodes=1"]
    return [*cmd, "-m", "llmtrain.launch.worker", str(config_path)]


def launch_local(cfg: Config) -> int:
    """Start the run on this machine; returns the exit code of the ranks."""
    from llmtrain.parallel.layout import build_dims

    # the world size is known here: check the layout and batch geometry before any rank is spawned
    build_dims(cfg, cfg.launcher.nproc * cfg.launcher.nnodes)
    run_dir = prepare_run(cfg)
    config_path = run_dir / "config.yaml"
    if cfg.launcher.nproc == 1 and cfg.launcher.nnodes == 1:
        from llmtrain.distributed.env import shutdown_distributed
        from llmtrain.launch.worker import run_training, setup_logging

        setup_logging(0, 1)
        try:
            run_training(str(config_path))
        finally:
            shutdown_distributed()
        return 0
    cmd = torchrun_command(cfg, config_path)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log.info("launching %d ranks: %s", cfg.launcher.nproc * cfg.launcher.nnodes, " ".join(cmd))
    return subprocess.call(cmd, env=env)
