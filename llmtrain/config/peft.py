"""Parameter-efficient fine-tuning schema (LoRA adapters on chosen projections)."""

from dataclasses import dataclass, field

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
