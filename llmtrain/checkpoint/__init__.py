"""Checkpointing: atomic sharded saves (sync or async), retention, auto-resume, safe loading, HF interop.

Modules: folder (on-disk layout, manifest), state (TrainerState: trainer_state.json), manager (save,
load, retention), policy (when to save, what to resume from), weights (weights-only checkpoints),
formats (DeepSpeed/megatron checkpoints as native weights), convert/hf/hf_tokenizer (Hugging Face),
lora_merge, dcp_io, rng. See docs/checkpoints.md and docs/architecture.md.
"""

from llmtrain.checkpoint.folder import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint_path,
)
from llmtrain.checkpoint.manager import CheckpointManager, SaveResult, retained_steps
from llmtrain.checkpoint.state import RankState, TrainerState

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "RankState",
    "SaveResult",
    "TrainerState",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint_path",
    "retained_steps",
]
