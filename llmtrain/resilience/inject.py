"""Test hooks: make rank 0's model output NaN (or scale it) on chosen data steps, or slow one rank's
compute (resilience.inject_*)."""

import time
from collections.abc import Iterator
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

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def slowed(modules: list[nn.Module], seconds: float) -> Iterator[None]:
    """Sleep `seconds` in the forward of `modules` during the block (0: no hook): a slow GPU or a
    noisy neighbour, in this rank's compute only (resilience.inject_slow_rank)."""
    if seconds <= 0:
        yield
        return

    def hook(_m: nn.Module, _args: Any) -> None:
        time.sleep(seconds)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
