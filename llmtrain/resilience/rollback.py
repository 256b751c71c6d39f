"""PaLM's recipe after repeated bad steps: reload the last checkpoint (model, optimizer, step, LR
position, RNG) but keep the data loader where it is, so the batches consumed since that checkpoint,
the offending window, are never seen again and the loader's stream continues exactly."""

from pathlib import Path
from typing import Any

from llmtrain.checkpoint import latest_checkpoint
from llmtrain.distributed.collectives import broadcast_object


class RollbackError(RuntimeError):
    """A rollback was due but there is no checkpoint to roll back to."""


def roll_back(trainer: Any) -> dict[str, Any]:
    """Reload the newest complete checkpoint into `trainer` (llmtrain.train.Trainer) through its own
    checkpoint manager, as the resume does, without touching the loader. Returns the event details."""
    trainer.finish_save()  # an async save in flight may be the newest checkpoint
    path: Path | None = broadcast_object(
        latest_checkpoint(trainer.ckpt.folder) if trainer.env.is_main else None
    )
    if path is None:
        raise RollbackError(
            f"resilience rollback at step {trainer.step}: no checkpoint in {trainer.ckpt.folder} yet "
            "(lower checkpoint.every_steps, or raise resilience.rollback_after)"
        )
    from_step, data = trainer.step, trainer.train_loader.state_dict()
    state = trainer.ckpt.load(path, trainer.engine, load_optimizer=True, model=trainer.cfg.model)
    trainer.step, trainer.tokens_seen, trainer.last_saved = state.step, state.tokens_seen, state.step
    trainer.ckpt.restore_rng(path, state)
    trainer.truncate_log()
    trainer.history[:] = [h for h in trainer.history if h["step"] <= trainer.step]
    saved = state.rank(trainer.env.rank).data.get("consumed")
    return {
        "checkpoint": str(path),
        "from_step": from_step,
        "to_step": state.step,
        "skipped_samples": None if saved is None else data["consumed"] - saved,
    }
