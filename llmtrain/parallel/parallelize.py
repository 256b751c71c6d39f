"""Apply a parallel layout to a meta-device model, in the documented order (docs/architecture.md):
pipeline split -> FP8 conversion -> TP -> EP -> context parallel attention -> activation
checkpointing -> compile -> FSDP/ZeRO -> materialize -> init weights -> DDP.

Each `apply_*` takes explicit arguments (a mesh, flags), never the whole config; `parallelize` is
the one place that reads the config and calls them. DDP comes after materialization because it
needs real parameters (it broadcasts them); FSDP2 shards meta parameters before they exist.
"""

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.config.parallel import ParallelConfig
from llmtrain.config.rules import stage_layer_counts
from llmtrain.models.llama import Transformer
from llmtrain.parallel.context_parallel import apply_context_parallel
from llmtrain.parallel.data_parallel import (
    DTYPE,
    GradSync,
    allreduce_grads,
    apply_ddp,
    apply_fsdp,
    zero12_accumulate,
)
from llmtrain.parallel.dims import ParallelDims
from llmtrain.parallel.expert_parallel import ep_grad_sync, expert_fsdp_kwargs, maybe_apply_ep
from llmtrain.parallel.fp8 import apply_fp8
from llmtrain.parallel.pipeline import local_stage_ids, split_stage
from llmtrain.parallel.tensor_parallel import apply_grad_layout_hooks, apply_tp

log = logging.getLogger("llmtrain")


def _warn_rank0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.warning(msg)


@dataclass
class ParallelModel:
    """What the engine gets back: this rank's model parts and how their gradients are reduced."""

    modules: list[nn.Module]
    """One module, or this rank's pipeline stages (each a Transformer holding a slice of layers)."""
    grad_sync: GradSync
    """How gradients are averaged over data-parallel ranks (DDP, FSDP2, or an all-reduce after the
    backward), as the hooks the step calls."""
    stage_ids: list[int] = field(default_factory=list)
    """Global pipeline stage index of each module (empty without pipeline parallelism)."""
    num_stages: int = 1


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Recompute block activations in backward: 'full' every block, 'selective' every other block.

    Uses the composable `checkpoint`, which hooks the module instead of wrapping it, so parameter
    names (and with them the layout-independent init and checkpoint keys) do not change.
    """
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint

    for i, block in enumerate(model.layers.values()):
        if mode == "full" or i % 2 == 0:
            checkpoint(block)


def apply_compile(model: Transformer) -> None:
    """torch.compile each block in place (`Module.compile` keeps the parameter names)."""
    for block in model.layers.values():
        block.compile()


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate real storage for a meta model (or stage) and initialise it deterministically."""
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
    """Split (pp), transform, materialize and init the meta model for this rank's place in `mesh`."""
    use_fsdp = cfg.zero_stage > 0 and dims.dp_shard * dims.cp > 1  # cp ranks shard too
    if cfg.cpu_offload and (device.type != "cuda" or not use_fsdp):
        _warn_rank0(
            f"parallel.cpu_offload=true is ignored: it needs ZeRO over dp_shard > 1 on a CUDA device "
            f"(here: device {device.type}, {dims.describe()}, zero_stage={cfg.zero_stage})"
        )
    stage_ids: list[int] = []
    num_stages = 1
    parts: list[Transformer] = [model]
    if dims.pp_enabled:
        assert mesh is not None
        num_stages = dims.pp * cfg.pp_virtual_stages
        counts = stage_layer_counts(model.args.n_layers, num_stages, cfg.pp_layers_per_stage)
        stage_ids = local_stage_ids(
            mesh["pp"].get_local_rank(), dims.pp, cfg.pp_virtual_stages, cfg.pp_schedule
        )
        parts = [split_stage(model, sid, counts) for sid in stage_ids]
    for part in parts:
        apply_fp8(part, cfg.fp8.recipe, cfg.fp8.emulate, cfg.fp8.exclude, device)  # before TP/compile/FSDP
        if dims.tp_enabled:
            assert mesh is not None
            apply_tp(part, mesh["tp"], cfg.sequence_parallel)
        maybe_apply_ep(part, dims)
        if dims.cp_enabled:
            assert mesh is not None
            apply_context_parallel(part, mesh["cp"].get_group())
        apply_activation_checkpointing(part, cfg.activation_checkpoint)
        if cfg.compile:
            apply_compile(part)
        if use_fsdp:
            assert mesh is not None
            dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate_enabled else dims.fsdp_mesh
            apply_fsdp(
                part,
                dp_mesh,
                cfg.zero_stage,
                DTYPE[cfg.param_dtype],
                DTYPE[cfg.reduce_dtype],
                cfg.cpu_offload and device.type == "cuda",
                **expert_fsdp_kwargs(dims),
                pipelined=dims.pp_enabled,
            )
        materialize(part, device, seed)
        if dims.tp_enabled and not use_fsdp:
            apply_grad_layout_hooks(part)
    modules: list[nn.Module] = list(parts)
    if use_fsdp:
        sync = GradSync(
            zero12_accumulate(modules, cfg.zero_stage) if cfg.zero_stage in (1, 2) else nullcontext
        )
    elif dims.dp_cp == 1:
        sync = GradSync()
    elif dims.ep_enabled:  # expert and dense gradients average over different groups
        sync = ep_grad_sync(modules, dims)
    elif dims.tp_enabled or dims.pp_enabled:  # DDP does not take DTensors or pipeline stages
        group = dims.dp_cp_mesh.get_group()  # cp ranks average weight gradients like dp ranks
        sync = GradSync(reduce=lambda: allreduce_grads(modules, group, dims.dp_cp))
    else:
        ddp = apply_ddp(model, dims.dp_cp_mesh)
        return ParallelModel([ddp], GradSync(accumulate=ddp.no_sync))
    return ParallelModel(modules, sync, stage_ids, num_stages)
