"""Construct models from config on the meta device (no memory is touched until materialization)."""

import dataclasses

import torch

from llmtrain.config.model import ModelConfig
from llmtrain.models.llama import Transformer, TransformerArgs


def model_args(cfg: ModelConfig) -> TransformerArgs:
    """Translate the config schema into the model's own argument dataclass."""
    fields = {f.name for f in dataclasses.fields(TransformerArgs)}
    return TransformerArgs(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields})


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> Transformer:
    """Build the decoder on `device` (meta by default: shapes only, for parallelize-then-materialize)."""
    with torch.device(device):
        return Transformer(model_args(cfg))


def count_params(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameter count (tied weights counted once)."""
    seen: dict[int, int] = {}
    for name, p in model.named_parameters():
        if exclude_embeddings and "tok_embeddings" in name:
            continue
        seen[id(p)] = p.numel()
    return sum(seen.values())


def count_active_params(model: torch.nn.Module) -> int:
    """Parameters one token uses: `count_params` minus the routed experts it is not sent to
    (num_experts - top_k of every MoE layer). Equals `count_params` for a dense model."""
    from llmtrain.models.moe import moe_layers

    inactive = 0
    for _, layer in moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.args.num_experts
        inactive += (layer.args.num_experts - layer.args.top_k) * per_expert
    return count_params(model) - inactive
