"""Reading other runs' checkpoints for fine-tuning: locate them, read their config, load some weights.

Used by distillation (the teacher), LoRA (the frozen base) and the evaluation/generation tools. Loads
go through DCP, so a checkpoint saved under one parallel layout loads under another.
"""

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from llmtrain.checkpoint import CheckpointError, read_state, resolve_checkpoint_path
from llmtrain.checkpoint.layout import ENGINE_DIR
from llmtrain.config import Config, ConfigError, to_config
from llmtrain.config.model import ModelConfig

MODEL_FOLDER = ENGINE_DIR


def resolve_checkpoint(path: str | Path, key: str) -> Path:
    """A step folder as is; a run folder or its checkpoints/ folder -> its newest complete checkpoint.
    Errors name the config key that gave the path."""
    try:
        return resolve_checkpoint_path(path)
    except CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from e


def checkpoint_state(path: Path) -> dict:
    """The trainer state of a checkpoint (step, config, MLflow run id, ...), verified."""
    return read_state(path)


def checkpoint_config(path: Path) -> Config:
    """The resolved config a checkpoint was trained with."""
    return to_config(checkpoint_state(path)["config"])


def checkpoint_model_config(path: Path) -> tuple[ModelConfig, str | None]:
    """(model config, tokenizer or None) of a checkpoint; also works for weights-only checkpoints
    (e.g. imported from Hugging Face) that record no more than their model."""
    cfg = checkpoint_state(path).get("config") or {}
    if not cfg.get("model"):
        raise ConfigError(f"{path}: the checkpoint records no model config")
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg["model"]))
    assert isinstance(model, ModelConfig)
    return model, (cfg.get("data") or {}).get("tokenizer")


def saved_model_keys(dcp_folder: Path) -> set[str]:
    """Model parameter names in a DCP folder (a checkpoint's model_optim/), from its metadata only."""
    meta = dcp.FileSystemReader(str(dcp_folder)).read_metadata()
    return {k[len("model.") :] for k in meta.state_dict_metadata if k.startswith("model.")}


def load_model_weights(model: nn.Module, path: Path, keep: Callable[[str], bool]) -> list[str]:
    """Collective: load the model parameters whose name passes `keep` from checkpoint `path`
    (others are left as they are). Returns the loaded names."""
    state = {k: v for k, v in get_model_state_dict(model).items() if keep(k)}
    missing = sorted(set(state) - saved_model_keys(path / MODEL_FOLDER))
    if missing:
        raise ConfigError(
            f"{path}: checkpoint lacks {len(missing)} model weights, e.g. {missing[:3]} "
            "(a different model config?)"
        )
    box = {"model": state}
    dcp.load(box, checkpoint_id=str(path / MODEL_FOLDER), no_dist=not dist.is_initialized())
    set_model_state_dict(model, box["model"], options=StateDictOptions(strict=False))
    return sorted(state)
