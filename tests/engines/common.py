"""Shared pieces of the engine parity tests: a tiny config, deterministic batches, the native reference.

Every engine sees the same global batch per step, split the way `llmtrain.data.loader.DataLoader`
splits it (micro-batch m of dp rank r holds samples [(m*dp + r)*mb, ...)), with an uneven number of
ignored targets per sample so that a per-micro-batch mean (instead of the global token-weighted mean)
would show up as a loss difference.
"""

import torch

from llmtrain.data.loader import IGNORE_INDEX, Batch

SEQ, VOCAB, GLOBAL_BATCH, MICRO = 16, 256, 8, 2
OVERRIDES = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    f"model.vocab_size={VOCAB}",
    "model.ffn_dim=64",
    "model.max_seq_len=64",
    f"data.seq_len={SEQ}",
    f"trainer.global_batch_size={GLOBAL_BATCH}",
    f"trainer.micro_batch_size={MICRO}",
    "trainer.seed=7",
    "optim.lr=3e-3",
    "optim.schedule=constant",
    "optim.warmup_steps=0",
    "optim.grad_clip=0.5",
    "optim.weight_decay=0.1",
    "checkpoint.enabled=false",
]
STEPS = 5
LR = 3e-3


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the whole step, shape (GLOBAL_BATCH, SEQ)."""
    g = torch.Generator().manual_seed(1000 + step)
    toks = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    inputs, targets = toks[:, :-1].clone(), toks[:, 1:].clone()
    for i in range(GLOBAL_BATCH):  # 0, 3, 6, ... ignored targets: uneven token counts
        targets[i, : (3 * i + step) % SEQ] = IGNORE_INDEX
    return inputs, targets


def rank_batches(step: int, dp: int, dp_rank: int) -> list[Batch]:
    """This dp rank's micro-batches of `step` (the DataLoader's split)."""
    inputs, targets = global_batch(step)
    accum = GLOBAL_BATCH // (MICRO * dp)
    out = []
    for m in range(accum):
        first = (m * dp + dp_rank) * MICRO
        out.append(Batch(inputs[first : first + MICRO], targets[first : first + MICRO]))
    return out


def run_steps(engine, dp: int, dp_rank: int, steps: int = STEPS, first: int = 0) -> list[tuple[float, float]]:
    """(loss, grad_norm) of `steps` optimizer steps at the constant LR."""
    return [
        (r.loss, r.grad_norm)
        for r in (engine.train_step(rank_batches(s, dp, dp_rank), LR) for s in range(first, first + steps))
    ]


def native_reference(
    cfg, steps: int = STEPS, final_state: dict | None = None, data_steps: list[int] | None = None
) -> list[tuple[float, float]]:
    """The single-process native run every engine is compared with: our model, init, AdamW and
    `llmtrain.parallel.step.train_step` directly (no engine wrapper, so it does not move while the native
    engine grows new layouts). `data_steps`: train on these batches only (a run that never drew the
    others), instead of batches 0 .. steps-1."""
    from llmtrain.models import build_model
    from llmtrain.optim import build_optimizer
    from llmtrain.parallel.step import StepContext, train_step

    model = build_model(cfg.model, "cpu")
    model.init_weights(cfg.trainer.seed)
    opt = build_optimizer(model, cfg.optim)
    out = []
    for s in range(steps) if data_steps is None else data_steps:
        for g in opt.param_groups:
            g["lr"] = LR
        r = train_step(model, opt, rank_batches(s, 1, 0), StepContext(1, None, cfg.optim.grad_clip))
        out.append((r.loss, r.grad_norm))
    if final_state is not None:  # the trained weights, for export/conversion checks
        final_state.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def max_rel_diff(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> tuple[float, float]:
    """Largest relative difference of the losses and of the grad norms."""
    dl = max(abs(x[0] - y[0]) / abs(y[0]) for x, y in zip(a, b, strict=True))
    dg = max(abs(x[1] - y[1]) / abs(y[1]) for x, y in zip(a, b, strict=True))
    return dl, dg


def write_native_checkpoint(state: dict, folder) -> None:
    """A native weights-only checkpoint folder (DCP, native names), as `checkpoint.init_from` reads."""
    from llmtrain.checkpoint.dcp_io import write_tensors

    write_tensors(folder, {k: v for k, v in state.items() if k != "rope"})


def switch_check(engine, dp: int, dp_rank: int) -> tuple[float, float]:
    """After loading weights only: one training step (fresh AdamW state) then a validation loss."""
    train = engine.train_step(rank_batches(STEPS, dp, dp_rank), LR).loss
    return train, engine.evaluate(rank_batches(STEPS + 1, dp, dp_rank))


def native_switch_reference(cfg, state: dict) -> tuple[float, float]:
    """`switch_check` on the native model loaded from `state`."""
    from llmtrain.models import build_model
    from llmtrain.optim import build_optimizer
    from llmtrain.parallel.step import StepContext, evaluate, train_step

    model = build_model(cfg.model, "cpu")
    model.init_weights(cfg.trainer.seed)
    model.load_state_dict(state)
    opt = build_optimizer(model, cfg.optim)
    for g in opt.param_groups:
        g["lr"] = LR
    ctx = StepContext(1, None, cfg.optim.grad_clip)
    r = train_step(model, opt, rank_batches(STEPS, 1, 0), ctx)
    return r.loss, evaluate(model, rank_batches(STEPS + 1, 1, 0), ctx)
