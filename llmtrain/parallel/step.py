"""One optimizer step: forward/backward over the micro-batches, token-weighted loss, clipping.

Loss math. The global loss of a step is  L = sum over every target token t in the global batch of
ce_t, divided by N = the global number of target tokens (summed over micro-batches and dp ranks).
Each rank backpropagates  sum_{t in its micro-batch} ce_t * dp / N  because DDP (and FSDP) *average*
gradients over the dp ranks: mean_r(dp * g_r / N) = sum_r g_r / N = dL/dw. Dividing by a per-micro-
batch token count instead would over-weight short micro-batches (e.g. padded or masked ones).

Tensor parallelism does not change this: the tp ranks of one dp rank compute the same loss (the
vocab-parallel cross-entropy all-reduces its partial sums) and each back-propagates into its own
shard. Pipeline parallelism uses the same per-micro-batch loss inside the schedule
(`llmtrain.parallel.pipeline.PipelineRunner`, driven by the native engine), with the same global N.

MoE auxiliary losses (llmtrain.models.moe) join the backward as  sum_rows n_row * aux_row  next to
the cross-entropy sum, so they carry the same dp / N scale and the same accumulation invariance; the
reported loss stays the cross-entropy (the router terms are logged as moe/* metrics).
"""

from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmtrain.data.loader import IGNORE_INDEX, Batch
from llmtrain.distributed.collectives import all_reduce_
from llmtrain.models.moe import collect_moe_losses, moe_step_discard, moe_step_end

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits, targets) -> summed cross-entropy over the target tokens."""


@dataclass
class StepResult:
    """Metrics of one optimizer step, identical on every rank."""

    loss: float
    grad_norm: float
    num_tokens: int
    skipped: bool = False
    """The optimizer step was skipped (StepContext.skip_when): parameters, optimizer state and LR
    position are those before the step, the gradients zeroed."""


SkipWhen = Callable[[float, float], bool]
"""(global loss, global grad norm) -> skip this optimizer step. Both values are already identical on
every rank (the all-reduced loss sum, the global norm), so every rank decides the same without a sync."""


def global_tokens(batches: list[Batch], group: dist.ProcessGroup | None) -> int:
    """Target tokens of a step over all micro-batches and data-parallel ranks (the N of the loss)."""
    n = torch.tensor([sum(b.num_tokens for b in batches)], dtype=torch.float64)
    return int(all_reduce_(n, group).item())


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over target tokens (fp32 for a stable log-softmax)."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(0, 1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def model_kwargs(batch: Batch, explicit_positions: bool = False) -> dict[str, torch.Tensor | bool]:
    """Keyword inputs of the model for a batch. `explicit_positions` passes RoPE positions even for
    plain causal batches (needed when the residual stream is sequence-sharded, see tensor_parallel)."""
    out: dict[str, torch.Tensor | bool] = {}
    if not getattr(batch, "causal", True):  # bidirectional objectives (llmtrain.objectives.masked_lm)
        out["causal"] = False
    if batch.positions is not None:
        out["positions"] = batch.positions
    elif explicit_positions:
        b, s = batch.inputs.shape
        out["positions"] = torch.arange(s, device=batch.inputs.device).expand(b, s)
    if batch.attn_mask is not None:
        out["attn_mask"] = batch.attn_mask
    return out


def forward_loss_sum(
    model: nn.Module, batch: Batch, loss_fn: LossFn = token_loss_sum, explicit_positions: bool = False
) -> torch.Tensor:
    """Model forward and summed token loss for one micro-batch."""
    logits = model(batch.inputs, **model_kwargs(batch, explicit_positions))
    return loss_fn(logits, batch.targets)


@dataclass(frozen=True)
class StepContext:
    """Everything a step needs besides the model, optimizer and batches; built once by the engine."""

    dp_size: int
    """Data-parallel degree (the dp of `scale`; see the module docstring)."""
    dp_group: dist.ProcessGroup | None
    """Group of the data-parallel replicas (None without data parallelism)."""
    grad_clip: float
    """Max global gradient norm (0: no clipping)."""
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
    """Mixed precision around forward/backward (torch.autocast for precision=bf16)."""
    accumulate: Callable[[], AbstractContextManager[Any]] = nullcontext
    """Wraps every micro-batch but a step's last (DDP no_sync, ZeRO-1/2 deferred reduction)."""
    reduce_grads: Callable[[], None] | None = None
    """After the last backward, when the engine averages gradients itself."""
    loss_fn: LossFn = token_loss_sum
    """Summed loss of one micro-batch (vocab-parallel under TP, distillation, ...)."""
    loss_ctx: Callable[[], AbstractContextManager[Any]] = nullcontext
    """Wraps forward and backward (loss_parallel under TP)."""
    explicit_positions: bool = False
    """Pass RoPE positions even for plain causal batches (sequence-sharded residual stream)."""
    skip_when: SkipWhen | None = None
    """Decides, before the optimizer step, whether to skip it (llmtrain.resilience: NaN/inf, spikes)."""


def skip_optimizer_step(
    optimizer: torch.optim.Optimizer, ctx: StepContext, loss: float, grad_norm: float
) -> bool:
    """True (and the gradients zeroed, nothing else touched) when ctx.skip_when refuses this step."""
    if ctx.skip_when is None or not ctx.skip_when(loss, grad_norm):
        return False
    optimizer.zero_grad(set_to_none=True)
    return True


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], ctx: StepContext
) -> StepResult:
    """Accumulate gradients over `batches`, clip, step; returns the true global mean loss."""
    n_global = global_tokens(batches, ctx.dp_group)
    scale = ctx.dp_size / max(n_global, 1)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with ctx.autocast(), ctx.loss_ctx(), ctx.accumulate() if not last else nullcontext():
            loss = forward_loss_sum(model, batch, ctx.loss_fn, ctx.explicit_positions)
            aux = collect_moe_losses(model, batch.targets.ne(IGNORE_INDEX).sum(-1))
            ((loss if aux is None else loss + aux) * scale).backward()
        loss_sum += loss.detach().double().cpu()
    if ctx.reduce_grads is not None:
        ctx.reduce_grads()
    all_reduce_(loss_sum, ctx.dp_group)
    grad_norm = clip_grad_norm(model, ctx.grad_clip)
    loss = float(loss_sum) / max(n_global, 1)
    if skip_optimizer_step(optimizer, ctx, loss, grad_norm):
        moe_step_discard(model)
        return StepResult(loss, grad_norm, n_global, skipped=True)
    optimizer.step()
    moe_step_end(model, ctx.dp_group)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, n_global)


def clip_grad_norm(
    model: nn.Module | Iterable[nn.Module], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> float:
    """Global L2 norm of the gradients (clipped in place when max_norm > 0).

    Parameters may be plain tensors, DTensors on a tp mesh, FSDP shards on a dp mesh, or a mix (TP
    without sequence parallel leaves the norms plain): norms are taken per (mesh, placements) group,
    made global with `full_tensor`, and summed; pipeline stages add their squares over `pp_group`.
    """
    modules = [model] if isinstance(model, nn.Module) else list(model)
    params = [p for m in modules for p in m.parameters() if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        g = p.grad
        groups[(g.device_mesh, g.placements) if hasattr(g, "device_mesh") else None].append(g)
    total_sq = torch.zeros((), dtype=torch.float64)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=False)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        total_sq += norm.detach().double().cpu() ** 2
    all_reduce_(total_sq, pp_group)
    total = float(total_sq.sqrt())
    if max_norm > 0:
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
    return total


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], ctx: StepContext) -> float:
    """Mean token loss over validation micro-batches of all dp ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        with ctx.autocast(), ctx.loss_ctx():
            totals[0] += forward_loss_sum(model, batch, ctx.loss_fn, ctx.explicit_positions).double().cpu()
        totals[1] += batch.num_tokens
    all_reduce_(totals, ctx.dp_group)
    model.train(was_training)
    return float(totals[0] / totals[1].clamp(min=1))
