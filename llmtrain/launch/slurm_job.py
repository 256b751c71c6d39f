"""The submitit callable that every SLURM task runs (docs/architecture.md), and its requeue logic.

One task per GPU (or per CPU rank). Each task derives torch.distributed's env:// variables from
SLURM: RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS, MASTER_ADDR = the NodeAddr
of the first host of SLURM_JOB_NODELIST, MASTER_PORT = a port derived from the job id (a requeued job
keeps its id, so it keeps its port; two jobs on one node get different ports); the tasks meet there
within launcher.rdzv_timeout_s or the job ends naming host:port (llmtrain.launch.rendezvous).

Stopping and requeueing. sbatch asks for `--signal=USR2@<launcher.signal_delay_s>`; SLURM delivers it
to every task. submitit would only let the rank-0 task act (its handler calls `checkpoint()` there and
requeues at once, before anything is saved), so this callable installs the trainer's StopFlag
handlers first thing instead. Every rank then agrees at the next step boundary, saves, and returns
from `Trainer.train()` with status KILLED. Rank 0 decides whether to requeue (a USR1/USR2 warning,
under launcher.max_requeues; a bare SIGTERM is a `scancel` or a scheduler preemption that requeues
by itself), broadcasts the decision, dumps `checkpoint()`'s DelayedSubmission of this same callable
over submitit's pickle and runs `scontrol requeue`. The next allocation resumes from the newest
complete checkpoint in the same run folder, and the tracker reopens the MLflow run recorded there.
"""

import atexit
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from llmtrain.launch.rendezvous import rendezvous_host, rendezvous_port

log = logging.getLogger("llmtrain")

WARNING_SIGNALS = frozenset({"SIGUSR1", "SIGUSR2"})
STOP_SIGNALS = frozenset({"SIGTERM", "SIGINT", "SIGHUP"})  # scancel, preemption, an operator
_exit_code = 0


def set_dist_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT from SLURM_*
    (MASTER_ADDR: the first node's NodeAddr, see llmtrain.launch.rendezvous)."""
    from llmtrain.distributed.env import slurm_local_world_size

    env = os.environ if environ is None else environ
    ntasks = int(env["SLURM_NTASKS"])
    values = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": str(ntasks),
        "LOCAL_WORLD_SIZE": str(slurm_local_world_size(env)),
        "MASTER_ADDR": rendezvous_host(env.get("SLURM_JOB_NODELIST", "")),
        "MASTER_PORT": str(rendezvous_port(env["SLURM_JOB_ID"])),
    }
    env.update(values)
    return values


def _hard_exit() -> None:
    """Skip interpreter teardown: gloo can abort it and turn a finished job into FAILED (docs/development.md)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_code)


def _meet(env: Any, cfg: Any) -> None:
    """Create the default process group on a store that every task reaches within
    launcher.rdzv_timeout_s, or end this task with one line naming host:port (its siblings are
    ended by srun --kill-on-bad-exit)."""
    from llmtrain.distributed.env import init_distributed, pick_device
    from llmtrain.launch.rendezvous import RendezvousError, meet

    if env.world_size < 2:
        return
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        store = meet(host, port, env.rank, env.world_size, cfg.launcher.rdzv_timeout_s)
    except RendezvousError as e:
        print(f"llmtrain: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    init_distributed(env, pick_device(cfg.trainer.device, env.local_rank), cfg.resilience.pg_timeout_s, store)


@dataclass
class TrainJob:
    """Picklable callable: `TrainJob(<resolved config.yaml>)()` trains one rank of the run."""

    config_path: str
    max_requeues: int
    time_min: int
    agent: bool = False
    """True: this task is the node agent that runs (and restarts) its node's ranks."""

    def __call__(self) -> dict[str, Any]:
        global _exit_code
        from llmtrain.train.signals import StopFlag

        early = StopFlag()  # replaces submitit's USR2 handler before anything slow happens
        early.install()
        atexit.register(_hard_exit)
        _exit_code = 1
        lease, keep = self._take_lease(), False
        try:
            result = self._run_agent(early) if self.agent else self._train(early)
        except SystemExit as e:
            keep = e.code == -1  # requeued: the next allocation of this job takes the lease over
            raise
        finally:
            if lease is not None and not keep:
                lease.release()
        _exit_code = 0
        return result

    def _run_agent(self, early: Any) -> dict[str, Any]:
        """resilience.max_restarts > 0: this task is its node's agent (launch/slurm_agent.py); a job
        that it ends leaves with the agent's code (a crash loop: 76)."""
        global _exit_code
        from llmtrain.launch.slurm_agent import AgentStop, run_node_agent

        try:
            return run_node_agent(self, early)
        except AgentStop as e:
            _exit_code = e.code
            raise

    def _take_lease(self) -> Any:
        """Rank 0 holds the run folder's lease while the job runs (after a requeue it takes over its
        own: same SLURM_JOB_ID); refused, the task fails and srun --kill-on-bad-exit ends the rest."""
        from pathlib import Path

        from llmtrain.launch.lease import LeaseHeld, acquire

        if os.environ.get("SLURM_PROCID", "0") != "0":
            return None
        try:
            return acquire(Path(self.config_path).parent)
        except LeaseHeld as e:
            print(f"llmtrain: run folder error: {e}", file=sys.stderr, flush=True)
            raise

    def _train(self, early: Any) -> dict[str, Any]:
        from llmtrain.config import load_config
        from llmtrain.distributed.env import detect_env, shutdown_distributed
        from llmtrain.launch.worker import setup_logging
        from llmtrain.train.trainer import Trainer

        dist_env = set_dist_env()
        env = detect_env()
        setup_logging(env.rank, env.world_size)
        cfg = load_config(self.config_path)
        if not cfg.trainer.num_threads:  # os.cpu_count() sees the whole node, not the allocation
            cfg.trainer.num_threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        # every rank (its own log file): where it runs and where it meets the others
        print(
            f"llmtrain: SLURM job {os.environ.get('SLURM_JOB_ID')}, allocation {restarts + 1}, node "
            f"{os.environ.get('SLURMD_NODENAME', '?')}, {env}, rendezvous {dist_env['MASTER_ADDR']}:"
            f"{dist_env['MASTER_PORT']}",
            file=sys.stderr,
            flush=True,
        )
        _meet(env, cfg)
        trainer = Trainer(cfg, env)
        if early.local():  # signalled while building: hand the flag over to the trainer's
            trainer.stop.received |= early.received
            trainer.stop.set(early.signal_name or "signal")
        result = trainer.train()
        outcome = self._agree_outcome(result["status"], trainer.stop.received, restarts)
        if outcome == "requeue" and env.rank == 0:
            self._requeue(restarts)
        shutdown_distributed()  # after the requeue call: clusters with KillOnBadExit kill siblings
        if outcome == "finished":
            return result
        self.leave(outcome, result["step"])
        raise AssertionError(outcome)  # leave() raised

    def leave(self, outcome: str, step: int) -> None:
        """End the task the way `outcome` (not "finished") says: requeued, terminated or exhausted."""
        if outcome == "requeue":
            raise SystemExit(-1)  # no result pickle: the job is not over
        if outcome == "terminated":  # scancel, or the scheduler preempting (then it requeues itself)
            log.warning("stopped at step %d on SIGTERM after saving; not requeueing myself", step)
            raise SystemExit(1)  # no result pickle: a scheduler requeue will still produce one
        raise RuntimeError(
            f"run stopped at step {step} on a pre-timeout/preemption signal and is not requeued: "
            f"launcher.max_requeues={self.max_requeues} reached; submit the same command again to resume "
            "from its last checkpoint"
        )

    OUTCOMES = ("finished", "requeue", "terminated", "exhausted")

    def _agree_outcome(self, status: str, received: set[str], restarts: int) -> str:
        """Rank 0 decides how the job ends and broadcasts it: all ranks must leave the same way.

        finished: trained to max_steps. requeue: stopped on USR1/USR2 (pre-timeout, or submitit-style
        preemption) with requeues left. terminated: stopped on SIGTERM alone. exhausted: requeues used up.
        """
        from llmtrain.distributed.collectives import broadcast_int

        outcome = self.stop_outcome(status, received, restarts)
        return self.OUTCOMES[broadcast_int(self.OUTCOMES.index(outcome))]

    def stop_outcome(self, status: str, received: set[str], restarts: int) -> str:
        """This process's view of the outcome (rank 0's is the one broadcast; a node agent's is its own)."""
        if status == "FINISHED":
            return "finished"
        if received and received <= STOP_SIGNALS:
            return "terminated"
        if restarts >= self.max_requeues:
            log.warning("not requeueing: launcher.max_requeues=%d reached", self.max_requeues)
            return "exhausted"
        return "requeue"

    def resubmission(self) -> Any:
        """This same callable as a DelayedSubmission for the next allocation: the training state is in
        the run folder's checkpoints, so nothing else is carried (`_requeue` dumps it)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainJob(self.config_path, self.max_requeues, self.time_min, self.agent))

    def checkpoint(self) -> Any:
        """submitit's Checkpointable hook (its name is submitit's, it saves nothing): the resubmission.
        Our own StopFlag handlers replace submitit's, so submitit itself never calls it before the
        trainer has saved; `_requeue` uses `resubmission` directly."""
        return self.resubmission()

    def _requeue(self, restarts: int) -> None:
        """Do what submitit does on rank 0, but after the checkpoint is complete."""
        import submitit

        job_env = submitit.JobEnvironment()
        delayed = self.resubmission()
        delayed.set_timeout(self.time_min, self.max_requeues)
        tmp = job_env.paths.submitted_pickle.with_suffix(".requeue.pkl")
        delayed.dump(tmp)
        tmp.replace(job_env.paths.submitted_pickle)
        job_id = job_env.job_id
        left = self.max_requeues - restarts - 1
        log.info("requeueing SLURM job %s (%d requeue(s) left after this one)", job_id, left)
        out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            log.error("scontrol requeue %s failed: %s", job_id, out.stderr.strip())
