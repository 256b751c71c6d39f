"""Expert parallelism: the routed experts of every MoE layer split over an `ep` group, tokens moved to
their experts and back with all-to-all (docs/moe.md).

Groups (`ParallelDims.expert_mesh`): the dp ranks, unflattened into (edp, ep) with ep innermost. Rank
`j` of an ep group holds experts [j * E/ep, (j+1) * E/ep) of every MoE layer, as a DTensor shard
(`Shard(0)` over `ep`), so state dicts and DCP checkpoints carry the *global* (E, in, out) tensors
under the usual names and load under any ep (or none).

Dispatch (`AllToAllDispatcher`, installed on each `MoE` as its `token_dispatcher`; as in torchtitan's
and Megatron-core's all-to-all token dispatchers): the (token, choice) rows arrive sorted by global
expert with counts (E,); the counts are exchanged first (one `all_to_all_single` of E integers), then
the rows (`all_to_all_single` with those splits), which arrive in (source rank, local expert) order and
are permuted to local-expert order for the grouped GEMM; the outputs go back the same way reversed.
`_AllToAll` is the differentiable exchange: its backward is the reverse all-to-all of the gradients.

Gradients: every rank backpropagates `loss * dp / N` (llmtrain.parallel.step), and an expert shard's
gradient already holds the contributions of the tokens of its whole ep group. Summed over the edp
ranks that hold the same experts and divided by dp (not by edp) it is the one-process gradient, as
the dense weights' average over all dp ranks is. Without ZeRO `reduce_ep_grads` does both reductions
after the backward; under ZeRO the experts are their own FSDP units over `edp` with gradient divide
factor dp (`apply_fsdp(expert_mesh=...)`).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from llmtrain.models.moe import GroupedExperts, MoE
from llmtrain.parallel.data_parallel import GradSync, average_tensors
from llmtrain.parallel.dims import ParallelDims


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows; the backward sends the gradients back along the reverse splits."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group  # type: ignore[attr-defined]
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        out_splits, in_splits = ctx.splits  # type: ignore[attr-defined]
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None  # type: ignore[attr-defined]


def _exchange(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class AllToAllDispatcher:
    """Runs the local experts on the rows of the whole ep group (module docstring)."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        self.num_local = num_experts // self.ep

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        """rows (R, dim) sorted by global expert, counts (E,) -> expert outputs in the same order."""
        ep, n_local = self.ep, self.num_local
        recv_counts = torch.empty_like(counts)  # [source rank, local expert], flattened
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        send = counts.view(ep, n_local).sum(1).tolist()
        grid = recv_counts.view(ep, n_local)
        recv = grid.sum(1).tolist()
        received = _AllToAll.apply(rows, recv, send, self.group)
        # (source, expert) blocks -> (expert, source) blocks, stable within each block
        block = torch.repeat_interleave(torch.arange(ep * n_local, device=grid.device), grid.flatten())
        order = ((block % n_local) * ep + block // n_local).argsort(stable=True)
        out = experts(received.index_select(0, order), grid.sum(0))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return _AllToAll.apply(out.index_select(0, inverse), send, recv, self.group)


def expert_modules(modules: list[nn.Module]) -> list[GroupedExperts]:
    """Every GroupedExperts (routed experts of an MoE layer) in the modules."""
    return [m for root in modules for m in root.modules() if isinstance(m, GroupedExperts)]


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard the routed experts of every MoE layer of a meta model over `ep_mesh` (Shard(0): this rank
    keeps its E/ep experts) and install the all-to-all dispatcher. Before FSDP, which then shards the
    local experts over edp (a 2-D DTensor, like TP + FSDP)."""
    rank, size = ep_mesh.get_local_rank(), ep_mesh.size()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            n_local = param.shape[0] // size
            local = param.detach().narrow(0, rank * n_local, n_local)
            shard = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, nn.Parameter(shard, requires_grad=param.requires_grad))
        moe.token_dispatcher = AllToAllDispatcher(ep_mesh.get_group(), moe.args.num_experts)


def maybe_apply_ep(model: nn.Module, dims: ParallelDims) -> None:
    """`apply_ep` over the ep mesh when ep > 1."""
    if dims.ep_enabled:
        apply_ep(model, dims.expert_mesh["ep"])


def expert_fsdp_kwargs(dims: ParallelDims) -> dict[str, object]:
    """`apply_fsdp`'s expert arguments: experts as units over edp, gradients divided by dp."""
    return {"expert_mesh": dims.expert_mesh["edp"], "expert_grad_divide": dims.dp} if dims.ep_enabled else {}


def ep_grad_sync(modules: list[nn.Module], dims: ParallelDims) -> GradSync:
    """Without ZeRO: `reduce_ep_grads` after the backward of a step's last micro-batch."""
    dp_group = dims.dp_mesh.get_group()
    edp_group = dims.expert_mesh["edp"].get_group() if dims.edp > 1 else None
    return GradSync(reduce=lambda: reduce_ep_grads(modules, dp_group, edp_group, dims.dp))


def reduce_ep_grads(
    modules: list[nn.Module], dp_group: dist.ProcessGroup, edp_group: dist.ProcessGroup | None, dp: int
) -> None:
    """Without ZeRO: dense gradients averaged over all dp ranks, expert gradients summed over the edp
    ranks (None: a single one) and divided by dp, the same one-process scale (module docstring)."""
    expert_ids = {id(p) for e in expert_modules(modules) for p in e.parameters()}
    dense, experts = [], []
    for root in modules:
        for p in root.parameters():
            if p.grad is None:
                continue
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            (experts if id(p) in expert_ids else dense).append(g)
    average_tensors(dense, dp_group, dp)
    average_tensors(experts, edp_group, dp)
