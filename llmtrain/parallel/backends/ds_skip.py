"""Skipping a DeepSpeed optimizer step (resilience.nonfinite / resilience.spike = skip, rollback, stop).

Where the decision can be made. DeepSpeed's `engine.step()` at the accumulation boundary runs one of
its optimizer wrappers (torch AdamW itself for ZeRO-0 fp32, FP16_UnfusedOptimizer for ZeRO-0 bf16,
DeepSpeedZeroOptimizer for ZeRO 1/2, the ZeRO-3 optimizer), and each computes the global gradient norm
(its one all-reduce, plus a host sync) inside its own `step()`, after the gradients were reduced into
its partitions. All of them then call our torch AdamW's `step()` (once per parameter group or ZeRO-3
sub-group) and only that call changes the fp32 masters and the Adam state (moments and `step`
counts). So `StepGate` replaces that one method: on its first call of a step it asks
`skip_when(loss, norm)` with the loss all-reduced before `engine.step()` and the norm the wrapper has
just computed (`_global_grad_norm`, or ours under ZeRO-0, where the gradients are whole), and when
told to skip it does nothing. What the wrapper does around it stays as in every step: clipping and
freeing the gradients, copying the unchanged masters into the bf16/partitioned weights (same values),
the ZeRO all-gather. No collective and no host sync is added: the norm is read once, as before.

DeepSpeed's own overflow path (ZeRO 1/2 and ZeRO-3 return before the optimizer on a non-finite norm)
never reaches the gate; the step is then skipped by DeepSpeed and only classified here. A finite step
(a loss spike) DeepSpeed never skips. Either way `finish` puts the engine's counters (`global_steps`,
`global_samples`, `micro_steps`) back where they were before the step, so the engine is as if the batch
had never been drawn, and counts it in DeepSpeed's `skipped_steps`.
"""

import math
from collections.abc import Callable
from typing import Any

import torch

from llmtrain.parallel.step import SkipWhen

COUNTERS = ("global_steps", "global_samples", "micro_steps")


class StepGate:
    """Owns the decision of one DeepSpeed step; installed on the torch optimizer DeepSpeed drives."""

    def __init__(self, engine: Any, base: torch.optim.Optimizer, skip_when: SkipWhen) -> None:
        self.engine, self.skip_when = engine, skip_when
        self._step = base.step
        base.step = self._gated_step  # the instance attribute wins over the class's (hooked) step
        self.loss, self.norm = math.nan, math.nan
        self._norm_fn: Callable[[], float] = lambda: math.nan
        self.decision: bool | None = None
        self._mark: dict[str, Any] = {}

    def begin(self) -> None:
        """At the start of a train step: remember the counters a skipped step must restore."""
        self._mark = {k: getattr(self.engine, k) for k in COUNTERS}
        self._mark["linked"] = getattr(self.engine.optimizer, "_hp_optimizer_states_linked", None)
        self._mark["skipped_steps"] = self.engine.skipped_steps
        self.decision = None

    def arm(self, loss: float, norm_fn: Callable[[], float]) -> None:
        """Before the boundary `engine.step()`: the global loss, and how to read the global norm."""
        self.loss, self._norm_fn = loss, norm_fn

    def _decide(self) -> bool:
        self.norm = float(self._norm_fn())
        self.decision = bool(self.skip_when(self.loss, self.norm))
        return self.decision

    def _gated_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.decision is None:
            self._decide()
        return None if self.decision else self._step(*args, **kwargs)

    def finish(self) -> tuple[float, bool]:
        """After the boundary `engine.step()`: (grad norm, skipped). A step DeepSpeed skipped by itself
        (non-finite norm) is classified now; a skipped step leaves the engine's counters unchanged."""
        applied = self.engine.was_step_applied()
        if self.decision is None:  # the wrapper never reached the optimizer (its overflow path)
            self._decide()
            self.decision = self.decision or not applied
        skipped = self.decision or not applied
        if skipped:
            for k in COUNTERS:
                setattr(self.engine, k, self._mark[k])
            self.engine.skipped_steps = self._mark["skipped_steps"] + 1
            if self._mark["linked"] is False:  # a first step skipped: link Adam's state on the next one
                self.engine.optimizer._hp_optimizer_states_linked = False
        return self.norm, skipped
