"""Optimizer and learning-rate schedule schema."""

from dataclasses import dataclass

SCHEDULES = ("cosine", "wsd", "linear", "constant")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with decoupled weight decay on matrices only, plus a warmup-then-decay schedule."""

    name: str = "adamw"
    """Optimizer (adamw)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of the peak."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to 2-D weights only (not norms, biases or embeddings)."""
    schedule: str = "cosine"
    """LR schedule after warmup: cosine, wsd (warmup-stable-decay), linear, constant."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to the peak lr."""
    decay_fraction: float = 0.2
    """WSD only: fraction of max_steps spent in the final linear decay."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value (0 disables)."""
