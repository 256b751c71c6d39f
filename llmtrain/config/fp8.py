"""FP8 training schema (`parallel.fp8`): which torchao float8 recipe converts the linear layers.

The conversion itself is `llmtrain.parallel.fp8.apply_fp8`; docs/fp8.md says what is converted,
what is filtered out and which layouts and devices are tested.
"""

from dataclasses import dataclass, field

FP8_RECIPES = ("none", "tensorwise", "rowwise", "mxfp8")


@dataclass(kw_only=True)
class Fp8Config:
    """Float8 matmuls in the transformer's linear layers; master weights stay in the param dtype."""

    recipe: str = "none"
    """none (off), tensorwise (one dynamic scale per tensor; fastest), rowwise (one scale per row,
    power-of-two scales; more accurate) or mxfp8 (32-element blocks; Blackwell GPUs only)."""
    emulate: bool = False
    """Run the FP8 casts and scales but do the matmul in high precision (torchao emulation): the way
    to test FP8 numerics on CPU or a GPU without FP8 tensor cores. Needed with trainer.device=cpu."""
    exclude: list[str] = field(default_factory=list)
    """Extra module-name substrings to keep in high precision (e.g. ['layers.0.']). The output head,
    MoE routers/gates and layers whose in/out features are not multiples of 16 are always kept."""
