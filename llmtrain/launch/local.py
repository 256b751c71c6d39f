"""Local launcher: run in this process (nproc=1) or spawn nproc ranks with torchrun's agent (gloo on CPU)."""

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmtrain.config import Config, load_config, save_config
from llmtrain.data import ensure_prepared, objstore
from llmtrain.launch.worker import ERROR_DIR_ENV
from llmtrain.train.signals import Interrupted, exit_code, interrupt_on_signals

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
    objstore.configure(cfg.storage)  # s3:// data sources are opened here already (their index)
    with open(run_dir / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        save_config(cfg, run_dir / "config.yaml")
        ensure_prepared(cfg.data)
    return run_dir


def preflight(cfg: Config, run_dir: Path) -> None:
    """What the ranks would refuse, refused before anything is written into the run folder (so a
    rejected resume leaves the previous config.yaml in place): the objective's own inputs (SFT files,
    the distillation teacher) and a read-only rehearsal of the resume (checkpoint/policy.py)."""
    from llmtrain.checkpoint.policy import check_resume
    from llmtrain.objectives.preflight import check_objective_inputs

    check_objective_inputs(cfg)
    check_resume(cfg.checkpoint, run_dir / "checkpoints", cfg.model)


def run_as_rank(cfg: Config) -> int:
    """Hydra main executed by each rank of a user-started torchrun/srun: prepare, then train here.

    Global rank 0 takes the run folder's lease before anything is written there and holds it while
    it trains; the other ranks keep their copy of the config outside the run folder and wait for rank
    0 at the process-group rendezvous, so a refused job writes nothing."""
    from llmtrain.distributed.env import detect_env
    from llmtrain.launch.lease import acquire
    from llmtrain.launch.worker import main as worker_main

    if detect_env().rank == 0:
        preflight(cfg, Path(cfg.run.root) / cfg.run.name)
        acquire(Path(cfg.run.root) / cfg.run.name)  # released by worker_main before it exits
        prepare_run(cfg)
    worker_main([], cfg=cfg)  # exits the process
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
    """Start the run on this machine; returns the exit code of the ranks (128+N after signal N).

    This process holds the run folder's lease for the whole job (on node_rank 0 of a multi-node
    launcher=torchrun job; the other nodes' launchers join that job)."""
    from llmtrain.launch.lease import hold
    from llmtrain.parallel.layout import build_dims

    # the world size is known here: check the layout and batch geometry before any rank is spawned
    build_dims(cfg, cfg.launcher.nproc * cfg.launcher.nnodes)
    run_dir = Path(cfg.run.root) / cfg.run.name
    preflight(cfg, run_dir)  # read-only: before the lease creates the run folder
    lease = hold(run_dir) if cfg.launcher.node_rank == 0 else contextlib.nullcontext()
    with lease:
        with interrupt_on_signals():  # stopped while preparing (tokenizing): one line, lease released
            prepare_run(cfg)
        if cfg.launcher.nproc == 1 and cfg.launcher.nnodes == 1:
            return _train_here(run_dir)
        return run_ranks(cfg, run_dir)


def _train_here(run_dir: Path) -> int:
    """nproc=1: train in this process; a stop signal saves at the step boundary (one line, 128+N)."""
    from llmtrain.distributed.env import shutdown_distributed
    from llmtrain.launch.worker import setup_logging, train

    setup_logging(0, 1)
    started = time.time()
    try:
        with interrupt_on_signals():
            cfg = load_config(run_dir / "config.yaml")
            _, stopped_by = train(cfg)
    except (Interrupted, KeyboardInterrupt) as e:  # during start-up, or a second Ctrl-C while saving
        stopped_by = getattr(e, "signal_name", "SIGINT")
    finally:
        shutdown_distributed()
    if stopped_by:
        print(f"llmtrain: {stop_summary(run_dir, stopped_by, started)}", file=sys.stderr)
        return exit_code(stopped_by)
    return 0


def stop_summary(run_dir: Path, signal_name: str, started: float) -> str:
    """The one line for a job stopped by a signal: what was saved, or why nothing was."""
    from llmtrain.checkpoint import latest_checkpoint

    newest = latest_checkpoint(run_dir / "checkpoints")
    if newest is not None and newest.stat().st_mtime >= started:
        return f"stopped by {signal_name}; saved {newest}: run the same command to resume from it"
    if newest is not None:
        return (
            f"stopped by {signal_name} before saving (stopped during start-up or pressed twice); "
            f"the same command resumes from the earlier {newest}"
        )
    return (
        f"stopped by {signal_name}; nothing saved (stopped during start-up or pressed twice, "
        "or checkpoint.enabled / checkpoint.save_at_end is false)"
    )


def _quiet_torchelastic() -> None:
    """torchrun's agent logs a warning per signal and a multi-line report per failed rank; the
    launcher says the same in one line, so its loggers only pass CRITICAL records."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(
            ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")
        ):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def run_ranks(cfg: Config, run_dir: Path) -> int:
    """Run the ranks under torchrun's elastic agent *in this process* (`_run_attempt`); with
    resilience.max_restarts > 0 a failed attempt (a rank crashed, a hang watchdog fired) starts all
    ranks again, which resume from the newest checkpoint, until the budget or a crash loop ends it
    (launch/restart.py). Multi-node torchrun jobs hand the budget to the agents (--max-restarts), which
    restart the nodes together; the crash-loop stop is then not applied."""
    from dataclasses import replace

    from llmtrain.launch.restart import RestartBudget
    from llmtrain.resilience.faults import ATTEMPT_ENV

    multinode = cfg.launcher.name == "torchrun" and cfg.launcher.nnodes > 1
    budget = RestartBudget(replace(cfg.resilience, max_restarts=0) if multinode else cfg.resilience, run_dir)
    while True:
        os.environ[ATTEMPT_ENV] = str(budget.attempt)
        code = _run_attempt(cfg, run_dir, warm=budget.cfg.max_restarts > 0)
        if code == 0 or code > 128:  # finished, or stopped by a signal (saved): never restarted
            return code
        decision = budget.after_failure(code)
        if decision.message:
            print(f"llmtrain: {decision.message}", file=sys.stderr)
        if not decision.restart:
            return decision.code


def _run_attempt(cfg: Config, run_dir: Path, warm: bool = False) -> int:
    """One start of all ranks (the same arguments a torchrun command would take, printed for
    reference): the agent forwards SIGTERM/SIGINT/SIGHUP to the ranks and waits for them to save
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default here 120 s), a rank's bad-input error comes back as the one
    `llmtrain: ...` line and exit code 2, and no torchrun process sits between this one and the ranks
    (which end when it dies, see signals.watch_parent). `warm`: the ranks are forks of a server that
    imported torch and the trainer once (launch/warm.py), so a restart does not pay the imports again."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    cmd = torchrun_command(cfg, run_dir / "config.yaml")
    log.info("launching %d ranks: %s", cfg.launcher.nproc * cfg.launcher.nnodes, " ".join(cmd))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    launch_cfg, entry, entry_args = config_from_args(parse_args(cmd[3:]))  # after "python -m torch...run"
    if cfg.launcher.name == "torchrun" and cfg.launcher.nnodes > 1:
        launch_cfg.max_restarts = cfg.resilience.max_restarts
    _quiet_torchelastic()
    started, handlers = time.time(), {s: signal.getsignal(s) for s in _AGENT_SIGNALS}
    with tempfile.TemporaryDirectory(prefix="llmtrain-errors-") as errors:
        os.environ[ERROR_DIR_ENV] = errors
        if warm:
            from llmtrain.launch.warm import warm_entry

            entry, entry_args = warm_entry(launch_cfg, Path(errors), run_dir / "config.yaml")
        try:
            elastic_launch(launch_cfg, entry)(*entry_args)
            return 0
        except ChildFailedError as e:
            return _rank_failure(e.failures, Path(errors), run_dir)
        except SignalException as e:
            print(f"llmtrain: {stop_summary(run_dir, e.sigval.name, started)}", file=sys.stderr)
            return exit_code(e.sigval.name)
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)
            for s, h in handlers.items():
                signal.signal(s, h)


_AGENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _rank_failure(failures: dict[int, Any], errors: Path, run_dir: Path) -> int:
    """Bad input on any rank: re-raise it here (the CLI prints one line, exit 2); otherwise one line
    naming the first failed rank (its traceback is above) and exit code 1, or HANG_EXIT_CODE when a
    rank's hang watchdog fired (its stacks are under <run_dir>/diagnostics)."""
    from llmtrain.launch.worker import input_errors
    from llmtrain.resilience import HANG_EXIT_CODE

    reports = sorted(errors.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    if reports:
        first = json.loads(reports[0].read_text())
        cls = next(c for c, k in input_errors().items() if k == first["kind"])
        raise cls(first["message"])

    def how(code: int) -> str:
        return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"

    # the first to fail is the cause; on a tie a rank killed by a signal (its peers then fail on it)
    order = sorted(failures.items(), key=lambda kv: (kv[1].timestamp, kv[1].exitcode >= 0, kv[0]))
    (rank, first), others = order[0], order[1:]
    also = "; then " + ", ".join(f"rank {r} {how(f.exitcode)}" for r, f in others) if others else ""
    hang = [r for r, f in failures.items() if f.exitcode == HANG_EXIT_CODE]
    why = f"; the hang watchdog fired on rank(s) {hang}, stacks in {run_dir / 'diagnostics'}" if hang else ""
    print(
        f"llmtrain: rank {rank} {how(first.exitcode)}{also} (output above){why}; the job stopped",
        file=sys.stderr,
    )
    return HANG_EXIT_CODE if hang else 1
