"""How much of the model a parameter-efficient run trains: printed at start and logged to MLflow.

Counted on the engine's model parts after parallelization: a DTensor (FSDP2/ZeRO shard) reports its
global size, so every rank gets the whole model's numbers; shared (tied) parameters count once.
"""

from torch import nn


def trainable_params(modules: list[nn.Module]) -> dict[str, float]:
    """MLflow metrics `params/total`, `params/trainable` and `params/trainable_share` (0..1)."""
    seen: dict[int, tuple[int, bool]] = {}
    for module in modules:
        for p in module.parameters():
            seen[id(p)] = (p.numel(), p.requires_grad)
    total = sum(n for n, _ in seen.values())
    trainable = sum(n for n, grad in seen.values() if grad)
    return {
        "params/total": float(total),
        "params/trainable": float(trainable),
        "params/trainable_share": trainable / max(total, 1),
    }


def describe_trainable(params: dict[str, float], method: str) -> str:
    """The console line, e.g. `peft.method=lora: training 4,096 of 215,168 parameters (1.90%)`."""
    total, trainable = int(params["params/total"]), int(params["params/trainable"])
    share = 100 * float(params["params/trainable_share"])
    return f"peft.method={method}: training {trainable:,} of {total:,} parameters ({share:.2f}%)"
