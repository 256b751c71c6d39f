"""Reductions of small CPU bookkeeping tensors (token counts, loss sums, norms) over any process group.

NCCL groups only reduce CUDA tensors, gloo groups reduce CPU tensors; the engines keep their metrics on
the CPU and move them to the current CUDA device only when the group needs it.
"""

import torch
import torch.distributed as dist

from llmtrain.data.loader import Batch


def all_reduce_(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place sum of a CPU tensor over `group` (no-op for None)."""
    if group is None:
        return t
    if dist.get_backend(group) == "nccl":
        on_device = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, group=group)
        t.copy_(on_device.cpu())
    else:
        dist.all_reduce(t, group=group)
    return t


def global_tokens(batches: list[Batch], group: dist.ProcessGroup | None) -> int:
    """Target tokens of a step over all micro-batches and data-parallel ranks."""
    n = torch.tensor([sum(b.num_tokens for b in batches)], dtype=torch.float64)
    return int(all_reduce_(n, group).item())
