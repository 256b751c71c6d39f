"""Parameter-efficient fine-tuning hooks for an engine (peft.method in the config).

The native engine calls, in this order:
    model = peft.apply(build_model(cfg.model))       # adapters on the meta model, base frozen
    model = parallelize(model, ...)                   # DDP / FSDP2 / ZeRO as usual
    peft.init(model, seed)                            # adapter init + base weights from init_from
and filters what it saves/loads with `peft.checkpoint_keys` and what it exports with `export_state`.
With peft.method=none every hook is the identity.
"""

from pathlib import Path

import torch
from torch import nn

from llmtrain.config import Config
from llmtrain.peft.lora import apply_lora, init_lora, is_adapter, merge_lora, merge_lora_state


class Peft:
    """No parameter-efficient method: every weight trains, is checkpointed and exported as is."""

    method = "none"

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def init(self, model: nn.Module, seed: int) -> None:
        return None

    def checkpoint_keys(
        self, state: dict[str, torch.Tensor], folder: Path | None = None
    ) -> dict[str, torch.Tensor]:
        """The part of a model state dict that a checkpoint holds (folder: the one being loaded)."""
        return state

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full (unsharded) model state -> weights of the plain model for export."""
        return state


class LoRA(Peft):
    """LoRA adapters (see llmtrain.peft.lora); checkpoints hold adapters only unless configured otherwise."""

    method = "lora"

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.p = cfg, cfg.peft
        self.scaling = self.p.alpha / self.p.rank

    def apply(self, model: nn.Module) -> nn.Module:
        apply_lora(model, self.p.rank, self.p.alpha, self.p.dropout, list(self.p.target_modules))
        return model

    def init(self, model: nn.Module, seed: int) -> None:
        from llmtrain.objectives.checkpoints import load_model_weights, resolve_checkpoint

        init_lora(model, seed)
        if self.cfg.checkpoint.init_from:
            base = resolve_checkpoint(self.cfg.checkpoint.init_from, "checkpoint.init_from")
            load_model_weights(model, base, keep=lambda k: not is_adapter(k))

    def checkpoint_keys(
        self, state: dict[str, torch.Tensor], folder: Path | None = None
    ) -> dict[str, torch.Tensor]:
        if folder is not None:
            from llmtrain.objectives.checkpoints import saved_model_keys

            # a base checkpoint (checkpoint.init_from): load its base weights, there are no adapters in it
            if not any(is_adapter(k) for k in saved_model_keys(folder)):
                return {k: v for k, v in state.items() if not is_adapter(k)}
        if self.p.adapters_only_checkpoint:
            return {k: v for k, v in state.items() if is_adapter(k)}
        return state

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return merge_lora_state(state, self.scaling)


def build_peft(cfg: Config) -> Peft:
    """The hook object for peft.method."""
    return LoRA(cfg) if cfg.peft.method == "lora" else Peft()


__all__ = [
    "LoRA",
    "Peft",
    "apply_lora",
    "build_peft",
    "init_lora",
    "is_adapter",
    "merge_lora",
    "merge_lora_state",
]
