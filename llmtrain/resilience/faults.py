"""Test hook: a rank stops (SIGSTOP), dies (SIGKILL) or exits in the forward of a chosen data step, on
chosen attempts of a job (resilience.inject_fault*; tests/resilience/test_hang.py)."""

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from llmtrain.config.resilience import ResilienceConfig
from llmtrain.resilience.inject import forward_hooks

ATTEMPT_ENV = "LLMTRAIN_ATTEMPT"
"""Set by the launcher for each in-job restart: 0 for the first start, then 1, 2, ..."""


def attempt() -> int:
    """Which start of the job this process belongs to (our launcher's restarts plus torch elastic's)."""
    return int(os.environ.get(ATTEMPT_ENV, "0")) + int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _strike(fault: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if fault == "exit":
        os._exit(1)
    os.kill(os.getpid(), signal.SIGSTOP if fault == "sigstop" else signal.SIGKILL)


@contextmanager
def injected_fault(
    cfg: ResilienceConfig, rank: int, data_step: int, modules: list[nn.Module]
) -> Iterator[None]:
    """Within the block, the forward of `modules` strikes when this rank, data step and attempt are the
    configured ones: mid-step, after the step's first collective, as a real crash or hang would."""
    n = attempt()
    fault = cfg.inject_fault[n] if n < len(cfg.inject_fault) else "none"
    hit = fault != "none" and rank == cfg.inject_fault_rank and data_step == cfg.inject_fault_step
    if not hit:
        yield
        return

    def hook(_m: nn.Module, _args: Any, _out: Any) -> None:
        _strike(fault)

    with forward_hooks(modules, hook):
        yield
