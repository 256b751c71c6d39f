"""Apply a parallel layout to a meta-device model, in the order of STYLE.md §2:
TP -> activation checkpointing -> compile -> FSDP/ZeRO or DDP -> materialize -> init weights.

Each `apply_*` takes explicit arguments (a mesh, flags), never the whole config.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.config.parallel import ParallelConfig
from llmtrain.config.validate import ConfigError
from llmtrain.models.llama import Transformer
from llmtrain.parallel.dims import ParallelDims


@dataclass
class ParallelModel:
    """What the trainer gets back: the module to call, and how to treat its gradients."""

    module: nn.Module
    grad_sync: str
    """'ddp' (torch DDP owns the all-reduce), 'none' (single process)."""


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Plain data parallel: gradients all-reduced (averaged) over the dp mesh during backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, process_group=dp_mesh.get_group(), broadcast_buffers=False)


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate real storage for a meta model and initialise it deterministically."""
    model.to_empty(device=device)
    target = model.module if hasattr(model, "module") else model
    assert isinstance(target, Transformer)
    target.init_weights(seed, buffer_device=device)


def parallelize(
    model: Transformer,
    dims: ParallelDims,
    cfg: ParallelConfig,
    mesh: DeviceMesh | None,
    device: torch.device,
    seed: int,
) -> ParallelModel:
    """Transform the meta model for the layout, materialize and init it."""
    if dims.tp_enabled or dims.pp_enabled or cfg.zero_stage > 0 or dims.dp_shard_enabled:
        raise ConfigError(
            f"parallel layout {dims.describe()} zero_stage={cfg.zero_stage} is not available yet on the "
            "native engine; use parallel=ddp"
        )
    materialize(model, device, seed)
    if dims.dp_enabled:
        assert mesh is not None
        return ParallelModel(apply_ddp(model, mesh["dp"]), "ddp")
    return ParallelModel(model, "none")
