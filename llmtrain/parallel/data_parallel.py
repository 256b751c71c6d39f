"""Data parallelism: DDP, ZeRO-1/2/3 and HSDP on FSDP2, and a plain gradient all-reduce.

ZeRO stages on FSDP2 (`fully_shard` per transformer block plus the root), as *what stays sharded
while a step runs*:

- stage 3: parameters, gradients and optimizer state. Parameters are all-gathered before each
  block's forward and again before its backward (`reshard_after_forward=True`); gradients are
  reduce-scattered per micro-batch.
- stage 2: gradients and optimizer state. Parameters stay unsharded from the first forward of a step
  to its last backward (`reshard_after_forward=False`, and no resharding after the backward of all
  but the last micro-batch: one all-gather per step); gradients are reduce-scattered per
  micro-batch, so only a 1/dp_shard slice of them is kept between micro-batches.
- stage 1: optimizer state only. Like stage 2, and in addition the gradient reduction and the
  resharding are deferred to the last micro-batch of the step (`set_requires_gradient_sync(False)`,
  `set_reshard_after_backward(False)` before the others): full gradients accumulate locally exactly
  as under DDP, then one reduce-scatter and the sharded AdamW update follow, and the next step starts
  with one all-gather of the updated parameters. That is the ZeRO-1 exchange (reduce-scatter +
  all-gather = one all-reduce of volume), and with a single micro-batch stage 1 and 2 coincide.
  Between steps the parameters rest sharded (FSDP2 owns them as DTensor shards), which saves memory
  over textbook ZeRO-1 without adding traffic.

HSDP is the same with a 2-D (dp_replicate, dp_shard) mesh: shard within groups, all-reduce across.
With tensor/pipeline parallelism and no ZeRO, gradients are all-reduced after the backward by
`allreduce_grads` (DDP itself does not take DTensor parameters).
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from llmtrain.models.llama import Transformer
from llmtrain.models.moe import GroupedExperts

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Plain data parallel: gradients all-reduced (averaged) over the dp mesh during backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # buffers (the RoPE table) are identical on every rank: synced once at init, never per forward
    return DDP(model, process_group=dp_mesh.get_group(), forward_sync_buffers=False)


def apply_fsdp(
    model: Transformer,
    dp_mesh: DeviceMesh,
    zero_stage: int,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    cpu_offload: bool,
    expert_mesh: DeviceMesh | None = None,
    expert_grad_divide: int = 1,
    *,
    pipelined: bool = False,
) -> None:
    """Shard `model` (or a pipeline stage) over `dp_mesh` (1-D dp_shard, or 2-D for HSDP) in place.

    Each block is its own FSDP unit so that only one block's parameters are unsharded at a time under
    stage 3; the root unit holds the embedding, final norm and output projection. With expert
    parallelism the routed experts of a block are a unit of their own over `expert_mesh` (edp), whose
    gradients are divided by `expert_grad_divide` (dp) instead of the edp size.

    `pipelined` (a stage of a pipeline): torch's schedules keep every stage's parameters unsharded
    and its gradients unreduced from the first backward of a step to the last
    (`PipelineStage.backward_maybe_with_nosync`), so whatever the stage, a pipeline stage holds its
    unsharded parameters and full gradients at its peak and reduce-scatters once per step. Resharding
    after each forward would then save no peak memory and only re-gather blocks every micro-batch
    (measured by the dry run: 2.6-3.8x the traffic), so stages do not reshard after forward.
    """
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"apply_fsdp needs zero_stage 1, 2 or 3, got {zero_stage}")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs: dict[str, object] = {"mesh": dp_mesh, "mp_policy": mp}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again right away by the backward: keep them
        last = i == len(blocks) - 1
        if expert_mesh is not None:  # experts: own units over edp, scaled to the one-process gradient
            for experts in (m for m in block.modules() if isinstance(m, GroupedExperts)):
                unit = fully_shard(
                    experts,
                    reshard_after_forward=zero_stage == 3 and not last and not pipelined,
                    shard_placement_fn=expert_placement(experts, expert_mesh.size()),
                    **{**kwargs, "mesh": expert_mesh},
                )
                unit.set_gradient_divide_factor(float(expert_grad_divide))
                # a sum then a division, not PREMUL_SUM (gloo refuses it); on one rank torch 2.13
                # would divide twice, so only where there is a reduce-scatter
                unit.set_force_sum_reduction_for_comms(expert_mesh.size() > 1)
        fully_shard(
            block,
            reshard_after_forward=zero_stage == 3 and not last and not pipelined,
            shard_placement_fn=expert_placement(block, _mesh_size(dp_mesh)),
            **kwargs,
        )
    fully_shard(model, reshard_after_forward=zero_stage == 3 and not pipelined, **kwargs)


def expert_placement(module: nn.Module, shards: int) -> Callable[[nn.Parameter], Shard | None]:
    """FSDP's dim for expert weights (E, in, out): the expert dim when this rank's experts split
    evenly over the `shards` FSDP ranks, else the larger of the other two that does.

    FSDP2 shards dim 0 and pads it: with fewer local experts than FSDP ranks (Mixtral's 8 experts at
    ep8 leave 1 per rank, ZeRO'd over edp=32) rank 0 of the group held every expert of its ep rank and
    the others only padding: 176 M parameters per layer on one rank instead of 5.5 M (found by the
    dry run, which ran out of memory at 256 ranks). torchtitan shards such experts on dim 1 as well.
    Parameters of `module` outside its GroupedExperts keep FSDP's default (None = Shard(0))."""
    experts = {id(p) for m in module.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}

    def place(p: nn.Parameter) -> Shard | None:
        if id(p) not in experts:
            return None
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.shape[0] % shards == 0:
            return Shard(0)
        dims = sorted((d for d in (1, 2) if p.shape[d] % shards == 0), key=lambda d: -p.shape[d])
        return Shard(dims[0]) if dims else Shard(0)

    return place


def _mesh_size(mesh: DeviceMesh) -> int:
    """Ranks a parameter is sharded over: the last dim of a 2-D HSDP mesh (replicated over the first)."""
    return mesh.size(mesh.ndim - 1)


@dataclass(frozen=True)
class GradSync:
    """How this rank's gradients become data-parallel averages, decided once by `parallelize`.

    `accumulate` wraps every micro-batch of a step but the last (DDP's no_sync, ZeRO-1/2's deferred
    reshard/reduce-scatter; a no-op otherwise); `reduce` runs after the last backward when the engine
    averages gradients itself (TP or PP without ZeRO), None when DDP/FSDP already did."""

    accumulate: Callable[[], AbstractContextManager[Any]] = nullcontext
    reduce: Callable[[], None] | None = None


def zero12_accumulate(modules: list[nn.Module], zero_stage: int) -> Callable[[], AbstractContextManager[Any]]:
    """`GradSync.accumulate` for ZeRO-1/2: no reshard (and for stage 1 no reduce-scatter) until the
    step's last micro-batch (see the module docstring)."""

    @contextmanager
    def accumulating() -> Iterator[None]:
        set_fsdp_accumulating(modules, True, zero_stage)
        try:
            yield
        finally:
            set_fsdp_accumulating(modules, False, zero_stage)

    return accumulating


def set_fsdp_accumulating(modules: list[nn.Module], accumulating: bool, zero_stage: int) -> None:
    """Between the micro-batches of a step (`accumulating`), keep the unsharded parameters (stages 1
    and 2: one all-gather per step) and, for stage 1, the full unsharded gradients too (one
    reduce-scatter per step). The last micro-batch runs with both back on."""
    for m in modules:
        if isinstance(m, FSDPModule):
            m.set_reshard_after_backward(not accumulating)
            if zero_stage == 1:
                m.set_requires_gradient_sync(not accumulating)


def allreduce_grads(modules: list[nn.Module], dp_group: dist.ProcessGroup, dp_size: int) -> None:
    """Average gradients over the data-parallel group (the DDP reduction, done once after the
    backward of the last micro-batch; used when DDP cannot wrap the model, i.e. with TP DTensors or
    pipeline stages)."""
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    average_tensors([g.to_local() if isinstance(g, DTensor) else g for g in grads], dp_group, dp_size)


def average_tensors(tensors: list[torch.Tensor], group: dist.ProcessGroup | None, divisor: int) -> None:
    """In place: sum over `group` (None: no other rank) and divide by `divisor`. Expert parallelism
    sums expert gradients over fewer ranks than it divides by (llmtrain.parallel.expert_parallel)."""
    if not tensors:
        return
    # one flat bucket per dtype: a single collective instead of one per parameter
    for dtype in {t.dtype for t in tensors}:
        group_ = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group_])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        offset = 0
        for t in group_:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
