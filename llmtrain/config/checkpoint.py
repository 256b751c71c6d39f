"""Checkpoint schema: cadence, retention, async save and resume policy."""

from dataclasses import dataclass


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and when checkpoints are written and which one a run starts from."""

    enabled: bool = True
    """Write checkpoints at all."""
    every_steps: int = 500
    """Save every N optimizer steps (0 disables step-based saves)."""
    every_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (0 disables)."""
    keep_last: int = 3
    """Keep the newest k complete checkpoints (the newest is never deleted)."""
    keep_every: int = 0
    """Also keep permanently every checkpoint whose step is a multiple of M (0 disables)."""
    async_save: bool = False
    """Block the step only for the device-to-host copy; write in the background."""
    save_at_end: bool = True
    """Save when training finishes or is interrupted by a signal."""
    resume: str = "auto"
    """auto = newest complete checkpoint in the run folder; none = start fresh; or a checkpoint path."""
    init_from: str | None = None
    """Fine-tuning: load model weights (only) from this checkpoint when the run has none of its own."""
    init_load_optimizer: bool = False
    """With init_from, also load the optimizer state."""
