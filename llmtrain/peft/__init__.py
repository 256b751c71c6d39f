"""Parameter-efficient fine-tuning (peft.method in the config) as a model transform for the engine.

The trainer (or a tool) builds the transform and hands it to the engine, which calls, in this order
(see llmtrain.parallel.engine.ModelTransform):
    model = transform.apply(build_model(cfg.model))   # adapters on the meta model, base frozen
    model = parallelize(model, ...)                   # DDP / FSDP2 / ZeRO as usual
    transform.init(model, seed)                       # adapter init
and filters what it saves/loads with `checkpoint_keys` and what it exports with `export_state`. The frozen
base weights come from `checkpoint.init_from`, loaded through the engine's own `load` by the trainer
(`base_checkpoint` tells it when). With peft.method=none the transform is the identity.
"""

import torch
from torch import nn

from llmtrain.config import Config
from llmtrain.models.lora import apply_lora, init_lora, is_adapter, merge_lora, merge_lora_state
from llmtrain.parallel.engine import ModelTransform


class LoRA(ModelTransform):
    """LoRA adapters (see llmtrain.models.lora); checkpoints hold adapters only unless configured otherwise."""

    method = "lora"

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.p = cfg, cfg.peft
        self.scaling = self.p.alpha / self.p.rank

    def apply(self, model: nn.Module) -> nn.Module:
        apply_lora(model, self.p.rank, self.p.alpha, self.p.dropout, list(self.p.target_modules))
        return model

    def init(self, model: nn.Module, seed: int) -> None:
        init_lora(model, seed)

    def checkpoint_keys(
        self, state: dict[str, torch.Tensor], saved: set[str] | None = None
    ) -> dict[str, torch.Tensor]:
        # a base checkpoint (checkpoint.init_from): load its base weights, there are no adapters in it
        if saved is not None and not any(is_adapter(k) for k in saved):
            return {k: v for k, v in state.items() if not is_adapter(k)}
        if self.p.adapters_only_checkpoint:
            return {k: v for k, v in state.items() if is_adapter(k)}
        return state

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return merge_lora_state(state, self.scaling)


def build_peft(cfg: Config) -> ModelTransform:
    """The transform for peft.method (the identity for none)."""
    return LoRA(cfg) if cfg.peft.method == "lora" else ModelTransform()


def base_checkpoint(cfg: Config) -> str | None:
    """The checkpoint whose weights sit under the trained ones and are not in this run's checkpoints
    (LoRA with adapters-only checkpoints: the frozen base, `checkpoint.init_from`). Loaded before any
    resume, by whoever builds the engine."""
    if cfg.peft.method == "lora" and cfg.peft.adapters_only_checkpoint:
        return cfg.checkpoint.init_from or None
    return None


__all__ = [
    "LoRA",
    "apply_lora",
    "base_checkpoint",
    "build_peft",
    "init_lora",
    "is_adapter",
    "merge_lora",
    "merge_lora_state",
]
