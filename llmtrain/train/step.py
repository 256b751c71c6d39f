"""One optimizer step: forward/backward over the micro-batches, token-weighted loss, clipping.

Loss math. The global loss of a step is  L = sum over every target token t in the global batch of
ce_t, divided by N = the global number of target tokens (summed over micro-batches and dp ranks).
Each rank backpropagates  sum_{t in its micro-batch} ce_t * dp / N  because DDP (and FSDP) *average*
gradients over the dp ranks: mean_r(dp * g_r / N) = sum_r g_r / N = dL/dw. Dividing by a per-micro-
batch token count instead would over-weight short micro-batches (e.g. padded or masked ones).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmtrain.data.loader import IGNORE_INDEX, Batch


@dataclass
class StepResult:
    """Metrics of one optimizer step, identical on every rank."""

    loss: float
    grad_norm: float
    num_tokens: int


def global_token_count(batches: list[Batch], dp_group: dist.ProcessGroup | None) -> int:
    """Target tokens in this step over all micro-batches and data-parallel ranks."""
    n = torch.tensor([sum(b.num_tokens for b in batches)], dtype=torch.float64)
    if dp_group is not None:
        dist.all_reduce(n, group=dp_group)
    return int(n.item())


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over target tokens (fp32 for a stable log-softmax)."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(0, 1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def forward_loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Model forward and summed token loss for one micro-batch."""
    logits = model(batch.inputs, positions=batch.positions, attn_mask=batch.attn_mask)
    return token_loss_sum(logits, batch.targets)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    *,
    dp_size: int,
    dp_group: dist.ProcessGroup | None,
    grad_clip: float,
    autocast: Callable[[], object],
    no_sync: Callable[[], object],
) -> StepResult:
    """Accumulate gradients over `batches`, clip, step; returns the true global mean loss."""
    n_global = global_token_count(batches, dp_group)
    scale = dp_size / max(n_global, 1)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with autocast(), no_sync() if not last else _null():
            loss = forward_loss_sum(model, batch)
            (loss * scale).backward()
        loss_sum += loss.detach().double().cpu()
    if dp_group is not None:
        dist.all_reduce(loss_sum, group=dp_group)
    grad_norm = clip_grad_norm(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(float(loss_sum) / max(n_global, 1), grad_norm, n_global)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global L2 norm of the gradients (clipped in place when max_norm > 0)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=False)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[Batch], dp_group: dist.ProcessGroup | None, autocast: Callable[[], object]
) -> float:
    """Mean token loss over validation micro-batches of all dp ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        with autocast():
            totals[0] += forward_loss_sum(model, batch).double().cpu()
        totals[1] += batch.num_tokens
    if dp_group is not None:
        dist.all_reduce(totals, group=dp_group)
    model.train(was_training)
    return float(totals[0] / totals[1].clamp(min=1))
