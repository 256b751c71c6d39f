"""In-job restart on SLURM (resilience.max_restarts > 0): one node agent per node restarts all ranks
inside the allocation.

Why a node agent and not a loop around srun: submitit writes the batch script and runs one `srun`
step from it, so a driver that re-runs the step would replace submitit's script; and a step whose
task died is torn down by srun (`--kill-on-bad-exit`) with SIGKILL, before anything can decide. With
the budget set, the job asks for ONE task per node instead (`cpus_per_task` times the node's ranks,
all its GPUs); that task (`TrainJob(agent=True)`) runs its node's ranks under torch's elastic agent,
in process, exactly as the local launcher does (`launch/local.py::_run_attempt`), and after a failed
attempt applies the same `RestartBudget` (crash-loop stop, exit 76, `restart`/`crash_loop` events).
The ranks resume from the newest complete checkpoint of the same run folder and MLflow run; the SLURM
job id and allocation stay the same. On several nodes every attempt meets at a static rendezvous on
the first node's NodeAddr (launch/rendezvous.py; the port moves by one per attempt), node 0's agent
decides and writes the decision into <run_dir>/slurm/, and the other agents follow it.

Signals: SLURM's USR1/USR2 (pre-timeout, preemption) reach the agent, which forwards them to its
ranks (`rank_pids`: the forks of its warm fork server, launch/warm.py; they save at the next step
boundary, as in a one-task-per-rank job) and then requeues as
`TrainJob` does; SIGTERM is forwarded by torch's agent. When a restart is impossible inside the
allocation (the attempt's rendezvous failed: an agent, i.e. a node, is gone) the job falls back to
`scontrol requeue` if launcher.max_requeues allows, and says so in one line.
"""

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmtrain.config import Config, load_config
from llmtrain.launch.restart import Decision, RestartBudget
from llmtrain.launch.slurm_checks import tasks_per_node

FORWARDED = ("SIGUSR1", "SIGUSR2")  # SIGTERM/SIGINT/SIGHUP: torch's agent forwards them itself


class AgentStop(RuntimeError):
    """The agent ends the job (crash loop, no restart left, no rendezvous): the task exits `code`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def uses_agents(cfg: Config) -> bool:
    """With an in-job restart budget the job runs one node agent per node (else one task per rank)."""
    return cfg.resilience.max_restarts > 0


def agent_parameters(cfg: Config, params: dict[str, Any]) -> dict[str, Any]:
    """submitit parameters for node agents: one task per node holding the CPUs of all its ranks."""
    return params | {"ntasks_per_node": 1, "cpus_per_task": cfg.launcher.cpus_per_task * tasks_per_node(cfg)}


def _children(pid: int | str = "self") -> list[int]:
    """Pids of a process's children, from /proc (Linux)."""
    pids: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with open(task / "children") as f:
                pids += [int(p) for p in f.read().split()]
    return pids


def rank_pids(launcher: int | str = "self") -> list[int]:
    """The ranks a launcher (default: this agent) started: its children, or under warm ranks
    (launch/warm.py) the children of its fork server; multiprocessing's own helpers (the fork server,
    the resource tracker) are not ranks, and a USR1/USR2 would kill them."""
    pids: list[int] = []
    for pid in _children(launcher):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing.forkserver" in cmd:
            pids += _children(pid)
        elif b"multiprocessing.resource_tracker" not in cmd:
            pids.append(pid)
    return pids


def forward_signals(stop: Any) -> None:
    """USR1/USR2 are recorded in `stop` (a StopFlag) and passed on to the ranks."""

    def handler(signum: int, frame: object) -> None:
        stop._handler(signum, frame)
        for pid in rank_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for name in FORWARDED:
        signal.signal(getattr(signal, name), handler)


def attempt_config(cfg: Config, node: int, nodes: int, attempt: int) -> Config:
    """How one attempt starts this node's ranks: local ranks on one node, a static torchrun
    rendezvous on the first node otherwise. The ranks read the run folder's config.yaml; this
    config only shapes the launch (max_restarts=0: the restarts are ours, not torch's agents')."""
    from llmtrain.launch.rendezvous import rendezvous_host, rendezvous_port

    lc, tpn = cfg.launcher, tasks_per_node(cfg)
    if nodes == 1:
        launcher = replace(lc, name="local", nproc=tpn, nnodes=1, node_rank=0)
    else:
        host = rendezvous_host(os.environ.get("SLURM_JOB_NODELIST", ""))
        port = rendezvous_port(os.environ["SLURM_JOB_ID"]) + attempt
        launcher = replace(
            lc, name="torchrun", nproc=tpn, nnodes=nodes, node_rank=node,
            rdzv_backend="static", rdzv_endpoint=f"{host}:{port}",
        )  # fmt: skip
    return replace(cfg, launcher=launcher, resilience=replace(cfg.resilience, max_restarts=0))


def _attempt(cfg: Config, run_dir: Path, node: int, nodes: int, attempt: int) -> tuple[int, str]:
    """Run one attempt of this node's ranks: (exit code, "") or (-1, why the ranks never started)."""
    from llmtrain.launch.local import _run_attempt
    from llmtrain.launch.worker import input_errors
    from llmtrain.resilience.faults import ATTEMPT_ENV

    os.environ[ATTEMPT_ENV] = str(attempt)
    try:
        return _run_attempt(attempt_config(cfg, node, nodes, attempt), run_dir, warm=True), ""
    except tuple(input_errors()):
        raise
    except Exception as e:  # the rendezvous of the attempt failed: a node agent did not come
        return -1, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _decision_file(run_dir: Path, attempt: int) -> Path:
    job, alloc = os.environ.get("SLURM_JOB_ID", "0"), os.environ.get("SLURM_RESTART_COUNT", "0")
    return run_dir / "slurm" / f"restart-{job}-{alloc}-{attempt}.json"


def shared_decision(budget: RestartBudget, code: int, node: int, nodes: int, timeout_s: float) -> Decision:
    """Node 0's agent decides (and records the event); the others read its decision from the run
    folder, so every node restarts, or stops, together."""
    path = _decision_file(budget.run_dir, budget.attempt)
    if node == 0:
        decision = budget.after_failure(code)
        if nodes > 1:
            path.write_text(json.dumps(decision.__dict__))
        return decision
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            return Decision(False, 1, f"node 0's agent did not decide within {timeout_s:g}s ({path})")
        time.sleep(0.2)
    decision = Decision(**json.loads(path.read_text()))
    budget.attempt += decision.restart
    return decision


def _finished(run_dir: Path, restarts: int) -> dict[str, Any]:
    return {"status": "FINISHED", "step": _last_step(run_dir), "restarts": restarts}


def run_node_agent(job: Any, early: Any) -> dict[str, Any]:
    """The node agent's loop: attempts until the ranks finish, a signal stops them (saved: requeue
    as TrainJob does), or the budget / a crash loop / a failed rendezvous ends the job."""
    from llmtrain.launch.worker import setup_logging

    env = os.environ
    node, nodes = int(env.get("SLURM_NODEID", "0")), int(env.get("SLURM_NNODES", "1"))
    allocation = int(env.get("SLURM_RESTART_COUNT", "0"))
    cfg, run_dir = load_config(job.config_path), Path(job.config_path).parent
    setup_logging(0, 1)
    print(
        f"llmtrain: SLURM job {env.get('SLURM_JOB_ID')}, allocation {allocation + 1}, node "
        f"{env.get('SLURMD_NODENAME', '?')}: node agent {node} of {nodes} for {tasks_per_node(cfg)} "
        f"rank(s), up to {cfg.resilience.max_restarts} in-job restart(s) (resilience.max_restarts)",
        file=sys.stderr,
        flush=True,
    )
    forward_signals(early)
    budget = RestartBudget(cfg.resilience, run_dir)
    while True:
        code, why = (0, "") if early.local() else _attempt(cfg, run_dir, node, nodes, budget.attempt)
        if early.local() or code > 128:
            _stopped(job, early.received | {_signal_name(code)}, allocation, node)
        if code == 0:
            return _finished(run_dir, budget.attempt)
        if code == -1:
            _fall_back_to_requeue(job, why, allocation, node)
        decision = shared_decision(budget, code, node, nodes, cfg.launcher.rdzv_timeout_s)
        if decision.message:
            print(f"llmtrain: {decision.message}", file=sys.stderr, flush=True)
        if not decision.restart:
            raise AgentStop(
                decision.message or f"the ranks failed (exit code {decision.code})", decision.code
            )


def _signal_name(code: int) -> str:
    return signal.Signals(code - 128).name if 128 < code < 128 + signal.NSIG else ""


def _stopped(job: Any, received: set[str], allocation: int, node: int) -> None:
    """The ranks stopped on a signal after saving: requeue (USR1/USR2), stop (SIGTERM) or give up."""
    received = {s for s in received if s}
    outcome = job.stop_outcome("KILLED", received, allocation)
    if outcome == "requeue" and node == 0:
        job._requeue(allocation)
    job.leave(outcome, _last_step(Path(job.config_path).parent))


def _last_step(run_dir: Path) -> int:
    from llmtrain.launch.restart import failed_step

    return failed_step(run_dir) - 1


def _fall_back_to_requeue(job: Any, why: str, allocation: int, node: int) -> None:
    """No restart inside this allocation is possible: requeue the job when launcher.max_requeues allows."""
    if allocation < job.max_requeues:
        print(
            f"llmtrain: in-job restart impossible ({why}); falling back to requeue "
            f"({allocation + 1} of launcher.max_requeues={job.max_requeues})",
            file=sys.stderr,
            flush=True,
        )
        if node == 0:
            job._requeue(allocation)
        raise SystemExit(-1)
    raise AgentStop(
        f"in-job restart impossible ({why}) and launcher.max_requeues={job.max_requeues} reached", 1
    )
