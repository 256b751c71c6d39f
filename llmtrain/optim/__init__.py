"""AdamW with weight-decay groups; LR schedules: warmup then cosine, wsd, linear or constant."""

import math

import torch
from torch import nn

from llmtrain.config.optim import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices that are not embeddings: decaying norms, biases or embedding rows hurts
    (they are not over-parameterised the way projections are)."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        ndim = len(getattr(p, "ds_shape", p.shape))  # DeepSpeed ZeRO-3 params are empty outside forward
        (decay if ndim >= 2 and "tok_embeddings" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the decay groups.

    foreach (multi-tensor kernels, the fast path on GPU) is left to torch unless the model mixes plain
    tensors and DTensors (e.g. TP without FSDP), where foreach fails (docs/development.md). On CPU torch
    uses the per-tensor loop either way, so CPU results do not depend on this choice.
    """
    groups = param_groups(model, cfg.weight_decay)
    kinds = {type(p).__name__ == "DTensor" for g in groups for p in g["params"]}
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=False if len(kinds) > 1 else None,
    )


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a never-stepped AdamW the state its first step would create (step 0, zero moments).

    torch's state-dict helpers (`get_state_dict`, used by every DCP save and load) initialise an empty
    optimizer by taking one step with zero gradients and lr 0: the moments stay zero but `step` becomes
    1, so a run resumed from a step-0 checkpoint (stopped during start-up) bias-corrected every later
    update differently. With this state in place they leave the optimizer alone, and the first real
    step is bitwise the same as in a run that never saved."""
    if optimizer.state:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                optimizer.state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.get_default_dtype()),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier on the peak lr for optimizer step `step` (0-based).

    warmup: linear from 1/(warmup+1) to 1. cosine: half-cosine to min_lr_ratio at max_steps.
    wsd: constant, then linear decay over the last decay_fraction of the run. linear: linear decay.
    """
    floor = cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1.0 - (1 - floor) * progress
    decay_start = max_steps - int(cfg.decay_fraction * max_steps)
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min((step - decay_start) / max(max_steps - decay_start, 1), 1.0)
