"""Rank/world discovery from torchrun or SLURM environment variables, and process-group setup."""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from llmtrain.config.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env() -> DistEnv:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; under srun without torchrun we read SLURM_*."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            int(env["SLURM_NTASKS"]),
            slurm_local_world_size(env),
        )
    return DistEnv(0, 0, 1, 1)


def parse_tasks_per_node(value: str) -> list[int]:
    """SLURM_TASKS_PER_NODE as tasks of each node: `2(x3),1` -> [2, 2, 2, 1], `4` -> [4]."""
    out: list[int] = []
    for part in value.split(","):
        count, _, times = part.strip().partition("(x")
        try:
            out += [int(count)] * (int(times.rstrip(")")) if times else 1)
        except ValueError:
            raise ValueError(f"SLURM_TASKS_PER_NODE={value!r}: not SLURM's 'N(xK),M' form") from None
    return out


def slurm_local_world_size(env: Mapping[str, str]) -> int:
    """Tasks per node of a SLURM job, from SLURM_TASKS_PER_NODE (always set in a job; the
    `--ntasks-per-node` variable SLURM_NTASKS_PER_NODE may be absent). The mesh puts tensor-parallel
    peers inside a node, so nodes with different task counts are refused, naming what SLURM gave."""
    raw = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
    if not raw:  # neither set (not inside a job step): the job's tasks spread evenly over its nodes
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        return max(int(env.get("SLURM_NTASKS", "1")) // nodes, 1)
    counts = parse_tasks_per_node(raw)
    if len(set(counts)) > 1:
        raise ConfigError(
            f"SLURM_TASKS_PER_NODE={raw}: nodes with different task counts ({counts}); llmtrain's layout "
            "needs the same number of tasks on every node: submit with --ntasks-per-node (launcher.nproc)"
        )
    return counts[0]


def pick_device(choice: str, local_rank: int) -> torch.device:
    """auto -> cuda:<local_rank> when CUDA is present, else cpu."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu|auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def process_group_backend(device: torch.device) -> str:
    """Backend of the default group: on GPU one group that serves CUDA tensors (NCCL) *and* host
    tensors (gloo), so bookkeeping collectives and object collectives work on it (see
    llmtrain.distributed.collectives); gloo on CPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


DEFAULT_PG_TIMEOUT_S = 600.0
"""resilience.pg_timeout_s's default, for callers without a config (inference tools)."""


def set_group_timeout(timeout_s: float) -> timedelta:
    """Make `timeout_s` the timeout of every process group created from now on in this process.

    `new_group(timeout=None)` falls back to torch's module default (30 min), and DeviceMesh, DeepSpeed
    and our own helper groups call it that way: a hung collective then waits 30 min whatever the
    default group was given. Setting c10d's module defaults makes every later group inherit ours."""
    timeout = timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    return timeout


def group_timeout(group: dist.ProcessGroup | None = None) -> timedelta:
    """The timeout `group` (default: the default group) was created with, as its backend reports it."""
    pg = group if group is not None else c10d._get_default_group()
    device = next(iter(pg._device_types), torch.device("cpu"))
    return pg._get_backend(device).options._timeout


def init_distributed(
    env: DistEnv,
    device: torch.device,
    timeout_s: float = DEFAULT_PG_TIMEOUT_S,
    store: dist.Store | None = None,
) -> None:
    """Create the default process group (`process_group_backend`) when running multi-process, with
    `timeout_s` (resilience.pg_timeout_s) for it and every group created later (`set_group_timeout`);
    on `store` when given (a rendezvous already made, e.g. the SLURM job's bounded one), else env://."""
    timeout = set_group_timeout(timeout_s)
    if env.world_size > 1 and not dist.is_initialized():
        backend = process_group_backend(device)
        if device.type == "cuda":  # NCCL Flight Recorder: keep the last collectives for a hang dump
            os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            device_id=device if device.type == "cuda" else None,
            store=store,
            timeout=timeout,
        )


def shutdown_distributed() -> None:
    """Barrier then destroy: avoids the gloo exit-time abort (docs/development.md, "gloo at exit")."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
