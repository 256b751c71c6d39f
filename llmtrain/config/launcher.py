"""Launcher schema: local processes, torchrun (multi-node without SLURM) or SLURM via submitit."""

from dataclasses import dataclass, field

LAUNCHERS = ("local", "torchrun", "slurm")


@dataclass(kw_only=True)
class LauncherConfig:
    """Where the ranks run. Fields of other launchers are ignored with a warning."""

    name: str = "local"
    """local (N processes on this machine), torchrun (multi-node rendezvous), slurm (submitit)."""
    nproc: int = 1
    """Processes per node (local/torchrun); on SLURM tasks_per_node."""
    nnodes: int = 1
    """torchrun: number of nodes."""
    node_rank: int = 0
    """torchrun: this node's rank."""
    rdzv_endpoint: str = "127.0.0.1:29500"
    """torchrun: host:port of the rendezvous (node 0)."""
    rdzv_backend: str = "static"
    """torchrun: static (node_rank fixes the ranks) or c10d (elastic; node_rank ignored)."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    qos: str | None = None
    """SLURM QoS."""
    nodes: int = 1
    """SLURM nodes."""
    gpus_per_node: int = 0
    """GPUs per node (one task per GPU); 0 = CPU ranks, tasks_per_node from nproc."""
    cpus_per_task: int = 1
    """CPUs per task."""
    mem_gb: int | None = None
    """Memory per node in GB."""
    time_min: int = 60
    """Wall-time limit in minutes."""
    constraint: str | None = None
    """SLURM --constraint."""
    exclusive: bool = False
    """Request whole nodes."""
    sbatch_args: dict[str, str] = field(default_factory=dict)
    """Extra sbatch parameters (name -> value)."""
    srun_args: list[str] = field(default_factory=list)
    """Extra srun arguments."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job (module load, source venv, exports)."""
    max_requeues: int = 10
    """How many times a timed-out or preempted job may requeue itself."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM signals the job to checkpoint."""
    rdzv_timeout_s: int = 300
    """SLURM: seconds the tasks have to meet at the first node's NodeAddr:port; then the job ends naming it."""
    logs_dir: str | None = None
    """submitit log folder; None = <run_dir>/slurm."""
