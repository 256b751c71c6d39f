"""Test hook: make rank 0's model output NaN (or scale it) on chosen data steps (resilience.inject_*)."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def scaled_outputs(modules: list[nn.Module], factor: float | None) -> Iterator[None]:
    """Multiply the outputs of `modules` by `factor` during the block (None: no hook). NaN makes the
    loss and every gradient of this rank NaN, as a bad batch or a flipped bit would; the step's loss
    all-reduce and the global grad norm then carry it to every rank."""
    if factor is None:
        yield
        return

    def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
        return out * factor

    with forward_hooks(modules, hook):
        yield


@contextmanager
def forward_hooks(modules: list[nn.Module], hook: Callable[[nn.Module, Any, Any], Any]) -> Iterator[None]:
    """`hook` on the forward of each of `modules` during the block (also resilience/faults.py)."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
