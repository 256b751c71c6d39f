"""Parameter-efficient fine-tuning schema (LoRA adapters on chosen projections)."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmtrain.config.schema import Config

PEFT_METHODS = ("none", "lora")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


@dataclass(kw_only=True)
class PeftConfig:
    """LoRA: W x + (alpha / rank) * B A x with A, B trainable and W frozen."""

    method: str = "none"
    """none (train every weight) or lora (train adapters only)."""
    rank: int = 8
    """Adapter rank r (A is r x in, B is out x r)."""
    alpha: float = 16.0
    """Scale numerator: the adapter output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input (training only)."""
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wv", "output"])
    """Linear layers (by attribute name) that get adapters: wq wk wv wo w1 w2 w3 output. The output
    head is in the default: without it SFT could not learn to end its answers (docs/workflows.md)."""
    adapters_only_checkpoint: bool = True
    """Checkpoints hold only the adapters (+ their optimizer state); the frozen base comes from
    checkpoint.init_from, which must then stay readable for resume and export."""


def validate_peft(cfg: "Config") -> None:
    """Choices and ranges of the peft group, naming the key."""
    from llmtrain.config.validate import check, check_choice

    p = cfg.peft
    check_choice("peft.method", p.method, PEFT_METHODS)
    if p.method == "none":
        return
    check(p.rank > 0, "peft.rank", f"must be positive, got {p.rank}")
    check(p.alpha > 0, "peft.alpha", f"must be positive, got {p.alpha}")
    check(0.0 <= p.dropout < 1.0, "peft.dropout", f"must be within [0, 1), got {p.dropout}")
    check(
        len(p.target_modules) > 0, "peft.target_modules", f"choose at least one of: {', '.join(LORA_TARGETS)}"
    )
    for name in p.target_modules:
        check(
            name in LORA_TARGETS,
            "peft.target_modules",
            f"{name!r} is not allowed; choose from {', '.join(LORA_TARGETS)}",
        )
    check(
        cfg.parallel.tp == 1 and cfg.parallel.pp == 1,
        "peft.method",
        f"lora supports data parallelism (DDP, ZeRO/FSDP2) only; got parallel.tp={cfg.parallel.tp}, "
        f"parallel.pp={cfg.parallel.pp}",
    )
    check(
        cfg.parallel.backend == "native",
        "peft.method",
        f"lora runs on parallel.backend=native only, got {cfg.parallel.backend}",
    )
    check(
        not cfg.checkpoint.init_load_optimizer,
        "checkpoint.init_load_optimizer",
        "must be false with peft.method=lora (the base run's optimizer state is for other parameters)",
    )
    if p.adapters_only_checkpoint:
        check(
            bool(cfg.checkpoint.init_from),
            "checkpoint.init_from",
            "peft.method=lora with peft.adapters_only_checkpoint=true needs the base checkpoint to fine-tune "
            "(or set peft.adapters_only_checkpoint=false)",
        )
