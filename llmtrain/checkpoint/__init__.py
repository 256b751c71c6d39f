"""Checkpointing: atomic sharded saves (sync or async), retention, auto-resume, safe loading, HF interop."""

from llmtrain.checkpoint.layout import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint_path,
)
from llmtrain.checkpoint.manager import CheckpointManager, SaveResult, read_state, retained_steps

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "SaveResult",
    "latest_checkpoint",
    "list_checkpoints",
    "read_state",
    "resolve_checkpoint_path",
    "retained_steps",
]
