"""Collectives on bookkeeping values, correct for every process-group backend.

Token counts, loss sums, gradient norms and stop/save flags live on the host. A gloo group reduces CPU
tensors; an NCCL group only CUDA tensors, so a CPU tensor on an NCCL group fails on the first step of
a multi-GPU run. `init_distributed` creates the default group as `cpu:gloo,cuda:nccl` (one group that
serves both devices), and every function here still checks which devices the group serves and moves the
value to the accelerator when the group has no CPU backend (subgroups created with backend="nccl", or a
default group made by another framework). Without a process group (one process) each is the identity.

Model tensors (gradients, activations, weights) are reduced by the parallel code on their own device;
this module is only for values the trainer reads back as Python numbers.
"""

from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def comm_device(group: ProcessGroup | None = None) -> torch.device:
    """The device a bookkeeping tensor must be on for `group`: the CPU when the group has a CPU backend
    (gloo, or a mixed cpu:gloo,cuda:nccl group), else the group's accelerator."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    devices = list(pg._device_types)
    if not devices or any(d.type == "cpu" for d in devices):
        return torch.device("cpu")
    kind = devices[0].type
    index = torch.cuda.current_device() if kind == "cuda" else None
    return torch.device(kind, index)


def all_reduce_(
    t: torch.Tensor, group: ProcessGroup | None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    """In place: reduce host tensor `t` over `group` (None: no reduction). Returns `t`."""
    if group is None or not dist.is_initialized():
        return t
    device = comm_device(group)
    if device.type == "cpu":
        dist.all_reduce(t, op=op, group=group)
    else:
        on_device = t.to(device)
        dist.all_reduce(on_device, op=op, group=group)
        t.copy_(on_device.cpu())
    return t


def world() -> ProcessGroup | None:
    """The default group when one exists (for agreement over all ranks), else None (one process)."""
    return dist.group.WORLD if dist.is_initialized() else None


def any_rank(flag: bool, group: ProcessGroup | None = None) -> bool:
    """True on every rank when `flag` is true on any rank of `group` (default: all ranks)."""
    t = torch.tensor([int(flag)], dtype=torch.int32)
    return bool(all_reduce_(t, group if group is not None else world(), dist.ReduceOp.MAX).item())


def broadcast_int(value: int, src: int = 0, group: ProcessGroup | None = None) -> int:
    """Rank `src`'s integer on every rank (a decision taken once, e.g. a clock-based save)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device(group))
    dist.broadcast(t, src=src, group=group)
    return int(t.item())


def gather_objects(obj: Any, group: ProcessGroup | None = None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (one process: `[obj]`)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: ProcessGroup | None = None) -> Any:
    """Rank `src`'s picklable `obj` on every rank (one process: `obj`)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: ProcessGroup | None = None) -> None:
    """Wait for every rank of `group` (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier(group=group)


def all_gather_floats(values: list[float], group: ProcessGroup | None = None) -> list[list[float]]:
    """Every rank's short list of floats (same length everywhere), in rank order, with one tensor
    all-gather (no pickling, no size exchange: cheap enough for a periodic probe). One process:
    `[values]`."""
    if not dist.is_initialized():
        return [list(values)]
    device = comm_device(group)
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [t.cpu().tolist() for t in out]
