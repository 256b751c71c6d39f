"""Measured peak tensor memory of real training steps on CPU, to validate the planner's estimate.

`torch.cuda.max_memory_allocated` has no CPU counterpart, and process RSS mixes in the allocator's
caching, the Python heap and libraries. `PeakTensorMemory` counts what the GPU counter counts: the
bytes of every live tensor storage created inside it (a TorchDispatchMode sees each op's outputs;
a weak reference on each storage says when it is freed).
"""

import weakref
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """Tracks live and peak bytes of tensor storages allocated while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def track(self, t: torch.Tensor) -> None:
        local = getattr(t, "_local_tensor", None)  # a DTensor's wrapper reports the global size
        if isinstance(local, torch.Tensor):
            t = local
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live or st.device.type == "meta":
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def measure_train_peak(
    model_cfg: Any,
    *,
    seq_len: int,
    micro_batch_size: int,
    grad_accum: int = 1,
    precision: str = "fp32",
    activation_checkpoint: str = "none",
    steps: int = 3,
) -> int:
    """Peak tensor bytes over `steps` single-process optimizer steps (weights, grads, AdamW state,
    activations and temporaries) through the trainer's own `train_step` and optimizer."""
    from llmtrain.config.optim import OptimConfig
    from llmtrain.data.loader import Batch
    from llmtrain.models.build import build_model
    from llmtrain.optim import build_optimizer
    from llmtrain.parallel.parallelize import apply_activation_checkpointing
    from llmtrain.parallel.step import StepContext, train_step

    gen = torch.Generator().manual_seed(0)
    vocab = model_cfg.vocab_size
    with PeakTensorMemory() as mem:
        model = build_model(model_cfg, device="cpu")
        model.init_weights(0)
        apply_activation_checkpointing(model, activation_checkpoint)  # as the native engine does
        optimizer = build_optimizer(model, OptimConfig())
        dtype = torch.bfloat16 if precision == "bf16" else None
        autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else nullcontext
        for _ in range(steps):
            batches = []
            for _ in range(grad_accum):
                toks = torch.randint(0, vocab, (micro_batch_size, seq_len + 1), generator=gen)
                batches.append(Batch(toks[:, :-1].contiguous(), toks[:, 1:].contiguous()))
            train_step(
                model,
                optimizer,
                batches,
                StepContext(dp_size=1, dp_group=None, grad_clip=1.0, autocast=autocast),
            )
            del batches
    return mem.peak


# (dim, n_layers, n_heads, n_kv_heads, vocab, tied, seq, micro_batch, accum, precision, checkpointing)
VALIDATION_CASES = [
    (128, 4, 4, 2, 512, False, 128, 4, 1, "fp32", "none"),
    (128, 4, 4, 2, 512, False, 128, 4, 1, "bf16", "none"),
    (128, 4, 4, 2, 4096, False, 128, 4, 1, "bf16", "none"),
    (128, 4, 4, 4, 4096, True, 128, 4, 1, "fp32", "none"),
    (128, 4, 4, 2, 512, False, 128, 4, 2, "fp32", "none"),
    (128, 4, 4, 2, 512, False, 128, 4, 1, "fp32", "full"),
    (128, 4, 4, 2, 512, False, 128, 4, 1, "bf16", "selective"),
    (128, 2, 4, 2, 4096, False, 128, 2, 2, "bf16", "full"),
    (256, 4, 8, 2, 2048, False, 256, 2, 1, "bf16", "none"),
]


def validate_estimates(cases: list[tuple] | None = None) -> list[dict[str, Any]]:
    """Estimate vs measured peak for each case (single process on CPU); error in percent."""
    from llmtrain.config.model import ModelConfig
    from llmtrain.models.build import model_args
    from llmtrain.plan.memory import Layout, estimate_memory

    rows = []
    for dim, layers, heads, kv, vocab, tied, seq, mbs, accum, prec, ac in cases or VALIDATION_CASES:
        cfg = ModelConfig(
            name="v",
            dim=dim,
            n_layers=layers,
            n_heads=heads,
            n_kv_heads=kv,
            vocab_size=vocab,
            ffn_dim=2 * dim,
            max_seq_len=seq,
            tie_embeddings=tied,
        )
        measured = measure_train_peak(
            cfg, seq_len=seq, micro_batch_size=mbs, grad_accum=accum, precision=prec, activation_checkpoint=ac
        )
        layout = Layout(micro_batch_size=mbs, activation_checkpoint=ac)
        est = estimate_memory(model_args(cfg), seq, layout, precision=prec, grad_accum=accum).total
        rows.append(
            {
                "model": f"d{dim} L{layers} h{heads}/{kv} V{vocab}{' tied' if tied else ''}",
                "seq": seq,
                "mbs": mbs,
                "accum": accum,
                "precision": prec,
                "ckpt": ac,
                "measured_mib": measured / 2**20,
                "estimate_mib": est / 2**20,
                "error_pct": 100 * (est - measured) / measured,
            }
        )
    return rows
