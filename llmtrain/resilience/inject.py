"""Test hooks: make rank 0's model output NaN (or scale it) on chosen data steps, or slow one rank's
compute (resilience.inject_*)."""

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
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
    with _output_hook(modules, lambda out: out * factor):
        yield


def _output_hook(modules: list[nn.Module], fn: Callable[[Any], Any]) -> AbstractContextManager[None]:
    """`fn(output)` replaces the output of every forward of `modules` during the block."""
    return forward_hooks(modules, lambda _m, _args, out: fn(out))


@contextmanager
def forward_hooks(modules: list[nn.Module], hook: Callable[[nn.Module, Any, Any], Any]) -> Iterator[None]:
    """`hook` on the forward of each of `modules` during the block (also resilience/faults.py)."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def slowed(modules: list[nn.Module], seconds: float) -> AbstractContextManager[None]:
    """Sleep `seconds` in the forward of `modules` during the block (0: no hook): a slow GPU or a
    noisy neighbour, in this rank's compute only (resilience.inject_slow_rank)."""

    def pause(out: Any) -> Any:
        time.sleep(seconds)
        return out

    return scaled_outputs(modules, None) if seconds <= 0 else _output_hook(modules, pause)
