"""LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A x, with W frozen and only A (r x in), B (out x r)
trained. B starts at zero, so the adapted model starts exactly at the base model.

`apply_lora` swaps the chosen `nn.Linear`s of a (meta-device) model for `LoRALinear`s *before*
parallelization. `LoRALinear` subclasses `nn.Linear` and keeps `weight` under the same name, so base
checkpoints load unchanged and the layout-independent init draws the same base weights; DDP buckets
only the trainable adapters and FSDP2/ZeRO shard base and adapters like any parameter.
`merge_lora` / `merge_lora_state` fold the adapters into the base weights for export.
"""

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.models.init import fill_param, uniform

ADAPTER_KEYS = ("lora_A", "lora_B")
_ADAPTER_RE = re.compile(r"\.lora_[AB]$")


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict key names a LoRA adapter matrix."""
    return bool(_ADAPTER_RE.search(name))


class LoRALinear(nn.Linear):
    """A linear layer with a trainable low-rank update next to its (frozen) weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]
) -> list[str]:
    """Replace every nn.Linear whose attribute name is in target_modules by a LoRALinear and freeze all
    non-adapter parameters. Returns the qualified names of the adapted layers."""
    adapted = []
    targets = set(target_modules)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
                adapted.append(f"{parent_name}.{child_name}".lstrip("."))
    if not adapted:
        raise ValueError(f"peft.target_modules={target_modules}: no nn.Linear with those names in the model")
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    return adapted


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (layout-independent: per-element counter-based draws), B = 0.

    Call after materialization: the model's own init also fills the adapters, which must be undone.
    Names are taken below a DDP wrapper (`module.`) so that every layout draws the same adapters."""
    model = getattr(model, "module", model)
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            bound = 1.0 / math.sqrt(mod.in_features)
            fill_param(mod.lora_A, uniform(bound), seed=seed, name=f"{name}.lora_A")
            mod.lora_B.zero_()


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict with adapters -> the plain model's state dict with
    W' = W + scaling * B @ A and the adapter keys removed."""
    out = {k: v for k, v in state.items() if not is_adapter(k)}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            a, b = state[key].float(), state[f"{prefix}.lora_B"].float()
            w = state[f"{prefix}.weight"]
            out[f"{prefix}.weight"] = (w.float() + scaling * (b @ a)).to(w.dtype)
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear of an unsharded model into a plain nn.Linear, in place; returns the model."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                merged = nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                delta = child.scaling * (child.lora_B.float() @ child.lora_A.float())
                merged.weight.copy_(child.weight.float() + delta)
                if child.bias is not None:
                    merged.bias.copy_(child.bias)
                setattr(parent, child_name, merged)
    return model
