"""FP8 training: torchao's float8 conversion of the transformer's linear layers (docs/fp8.md).

`apply_fp8` swaps `nn.Linear` for torchao's `Float8Linear` (tensorwise, rowwise) or wraps the weights
for MXFP8, on the meta model, before tensor parallelism, compile and FSDP (the order torchtitan uses:
the parallel transforms then see the float8 modules). Only the matmuls run in FP8: the parameters
keep their names and their dtype (fp32, or the FSDP param dtype), so a checkpoint saved with FP8
loads with it off and the other way round.

Kept in high precision (`fp8_filter`):
- the output head (`output`): its logits feed the loss directly and FP8 error there costs accuracy
  for little speed (torchtitan and torchao's examples skip it too);
- MoE routers/gates (a module name containing `router`, or `gate` inside an MoE block): expert
  choice is discrete and sensitive to small logit changes;
- layers whose in or out features are not multiples of 16: the FP8 GEMM kernels need 16-aligned
  dimensions;
- any name containing one of `parallel.fp8.exclude`.
torchao is an optional extra: `pip install 'llmtrain[fp8]'`.
"""

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from llmtrain.config.errors import ConfigError

log = logging.getLogger("llmtrain")

INSTALL_HINT = "pip install 'llmtrain[fp8]'  (torchao)"
ALIGN = 16
"""FP8 GEMMs (cuBLAS/CUTLASS scaled_mm) need both matrix dimensions to be multiples of 16."""


def fp8_filter(exclude: Sequence[str] = ()) -> Callable[[nn.Module, str], bool]:
    """The `module_filter_fn` deciding which linear layers run in FP8 (see the module doc)."""

    def keep_fp8(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return True  # torchao asks about every module; only linear layers get swapped
        leaf = fqn.rsplit(".", 1)[-1]
        if leaf == "output" or "router" in fqn or (leaf == "gate" and ("moe" in fqn or "experts" in fqn)):
            return False
        if module.in_features % ALIGN or module.out_features % ALIGN:
            return False
        return not any(s in fqn for s in exclude)

    return keep_fp8


def check_fp8_device(recipe: str, emulate: bool, device: torch.device) -> None:
    """Refuse devices that cannot run `recipe`, naming the key and the reason."""
    if recipe == "mxfp8":
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if cap is None or cap < (10, 0):
            raise ConfigError(
                f"parallel.fp8.recipe=mxfp8 needs a Blackwell GPU (CUDA capability >= 10.0, e.g. B200); "
                f"this device is {device.type}{f' sm_{cap[0]}{cap[1]}' if cap else ''}: use tensorwise or rowwise"
            )
        return
    if emulate:
        return
    if device.type != "cuda":
        raise ConfigError(
            f"parallel.fp8.recipe={recipe} on {device.type} needs parallel.fp8.emulate=true "
            "(no FP8 matmul on this device; emulation casts to FP8 and multiplies in high precision)"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ConfigError(
            f"parallel.fp8.recipe={recipe} needs FP8 tensor cores (CUDA capability >= 8.9: H100, H200, "
            f"B200, L40S, L4); this GPU is sm_{cap[0]}{cap[1]}: set parallel.fp8.recipe=none, or "
            "parallel.fp8.emulate=true to test the numerics slowly"
        )


def _import_torchao():
    try:
        import torchao.float8 as float8
    except ImportError as e:
        raise ConfigError(f"parallel.fp8.recipe needs torchao, which is not installed: {INSTALL_HINT}") from e
    return float8


def apply_fp8(
    model: nn.Module,
    recipe: str,
    emulate: bool = False,
    exclude: Sequence[str] = (),
    device: torch.device | None = None,
) -> list[str]:
    """Convert `model`'s eligible linear layers in place (before TP, compile and FSDP); returns the
    names of the converted layers. recipe 'none' leaves the model as it is."""
    if recipe == "none":
        return []
    if device is not None:
        check_fp8_device(recipe, emulate, device)
    keep = fp8_filter(exclude)
    converted = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(m, n)]
    float8 = _import_torchao()
    if recipe == "mxfp8":
        from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
        from torchao.quantization import quantize_

        config = MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe.MXFP8_RCEIL)
        quantize_(model, config, filter_fn=keep)
    else:
        config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
        float8.convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return converted
