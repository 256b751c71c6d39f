"""Rank/world discovery from torchrun or SLURM environment variables, and process-group setup."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
            int(env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"]).split("(")[0]),
        )
    return DistEnv(0, 0, 1, 1)


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


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """Create the default process group (`process_group_backend`) when running multi-process."""
    if env.world_size > 1 and not dist.is_initialized():
        backend = process_group_backend(device)
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            device_id=device if device.type == "cuda" else None,
        )


def shutdown_distributed() -> None:
    """Barrier then destroy: avoids the gloo exit-time abort (docs/development.md, "gloo at exit")."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
