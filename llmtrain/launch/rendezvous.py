"""Where and how the tasks of a SLURM job meet: the rendezvous host, its port, and a bounded wait.

Host: the first node of SLURM_JOB_NODELIST reached the way SLURM itself reaches it, by its `NodeAddr`
(`scontrol show node -o <name>`). Node names need not resolve on the compute network (they do not on
some clusters, nor on the two-node test cluster), and a TCPStore client retries an unresolvable name
silently until its timeout. When scontrol cannot answer, the name itself is used (name resolution).

Port: `PORT_BASE + job_id % PORT_SPAN`, the same on every task and after a requeue (the job keeps its
id); jobs running at the same time on one node have different ids, so different ports unless their
ids differ by a multiple of PORT_SPAN (array tasks have ids of their own too).

Wait: rank 0 serves a TCPStore on that port and every task connects to it within
`launcher.rdzv_timeout_s`; the default process group is then created on that store. A task that
cannot reach it, a rank 0 that waits in vain for the others, or a port already taken end the task
with one line naming host:port, and `srun --kill-on-bad-exit` ends the others.
"""

import subprocess
from datetime import timedelta
from typing import Any

PORT_BASE, PORT_SPAN = 15000, 10000  # below the Linux ephemeral range (32768+)


class RendezvousError(RuntimeError):
    """The tasks did not meet: the message names host:port, the timeout and what went wrong."""


def rendezvous_port(job_id: str) -> int:
    """Deterministic port for a job: the same on every task and after every requeue."""
    return PORT_BASE + int(job_id.split("_")[0]) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list (`gpu[003-004,010],cpu1` -> `gpu003`)."""
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)[0] if nodelist else "127.0.0.1"


def parse_node_addr(scontrol_output: str) -> str | None:
    """NodeAddr from `scontrol show node -o <name>` output (None when absent or empty)."""
    for field in scontrol_output.split():
        key, _, value = field.partition("=")
        if key == "NodeAddr" and value and value != "(null)":
            return value
    return None


def node_addr(name: str, timeout_s: float = 20.0) -> str | None:
    """The node's NodeAddr as slurmctld knows it, or None when scontrol is missing or fails."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", name], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_node_addr(out.stdout) if out.returncode == 0 else None


def rendezvous_host(nodelist: str) -> str:
    """Address of the job's first node: its NodeAddr, else its name (left to name resolution)."""
    name = first_host(nodelist)
    return node_addr(name) or name


def meet(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    """All `world_size` tasks meet at host:port within timeout_s; returns the TCPStore to build the
    process group on. Raises RendezvousError with one line naming host:port otherwise."""
    import torch.distributed as dist

    try:
        return dist.TCPStore(
            host,
            port,
            world_size,
            is_master=rank == 0,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=True,
        )
    except (RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        role = "serving" if rank == 0 else "reaching"
        raise RendezvousError(
            f"rank {rank}/{world_size}: rendezvous failed {role} {host}:{port} within {timeout_s:g}s "
            f"(launcher.rdzv_timeout_s): {reason}"
        ) from None
