"""Checkpointing: atomic sharded saves, retention, auto-resume."""

from llmtrain.checkpoint.manager import (
    CheckpointError,
    CheckpointManager,
    latest_checkpoint,
    list_checkpoints,
)

__all__ = ["CheckpointError", "CheckpointManager", "latest_checkpoint", "list_checkpoints"]
