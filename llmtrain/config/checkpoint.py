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
    async_staging_dir: str | None = None
    """RAM staging folder for async saves of engines without a host snapshot (DeepSpeed, megatron);
    None = /dev/shm, else the system temp folder."""
    save_at_end: bool = True
    """Save when training finishes or is interrupted by a signal."""
    resume: str = "auto"
    """auto = newest complete checkpoint in the run folder; none (or false) = start fresh (refused when the
    run folder holds checkpoints); or a checkpoint path, used while the run has no checkpoint of its own."""
    init_from: str | None = None
    """Fine-tuning: load model weights (only) from this checkpoint when the run has none of its own."""
    init_load_optimizer: bool = False
    """With init_from, also load the optimizer state."""
    mirror: str | None = None
    """Object-store folder (`s3://bucket/prefix`, any fsspec URI) that every complete checkpoint is
    uploaded to in the background (objects first, COMPLETE last; retention applies there too). A run
    with no local checkpoint resumes from the newest complete one there (docs/storage.md)."""


RESUME_OFF = ("none", "false", "no", "off")
RESUME_AUTO = ("auto", "true", "yes", "on")


def resume_mode(value: object) -> str:
    """Normalize checkpoint.resume: 'auto', 'none', or a path (YAML may hand us a bool)."""
    text = str(value).strip()
    if text.lower() in RESUME_OFF:
        return "none"
    if text.lower() in RESUME_AUTO:
        return "auto"
    if not text:
        raise ValueError("checkpoint.resume: empty; allowed: auto, none (false) or a checkpoint path")
    return text
