"""Straggler probe: every `resilience.straggler_every` data steps, each rank's step time split into
compute and waiting in collectives, gathered with one small all-gather; ranks whose compute exceeds the
median by more than `straggler_threshold` are named with their host (docs/resilience.md, Stragglers).

How the wait is measured (CPU/gloo and GPU alike, no change to the step's math):

- a `barrier()` before a probed step aligns the ranks, so the step's clock starts together everywhere;
- post-accumulate-grad hooks on the rank's parameters note when its *own* last gradient was produced
  (the end of its backward compute), and an optimizer step pre-hook notes when the step may update,
  i.e. when the gradient sync (DDP's bucket all-reduces waited on at the end of backward, the
  engine's own all-reduce, the loss all-reduce, the grad-norm reduction) has completed;
- wait = (sync done) - (own gradients ready); compute = step time - wait.

A rank slowed in its compute produces its gradients last and finds the others' already there: small
wait, large compute. The ranks it holds back have their gradients early and sit in the all-reduce:
their wait is the slow rank's extra compute. Limits: collectives *inside* the forward/backward (FSDP's
per-block all-gathers and reduce-scatters, TP's activation all-reduces, pipeline sends/receives) are
counted as compute, so under ZeRO-3/TP/PP the split under-states the wait of the fast ranks (the named
rank is still the one with the largest compute: it is the one the others wait for at the end). The
trailing compute after the sync (clipping's arithmetic) is counted as wait; it is small. A skipped
optimizer step (resilience skip) ends the wait at the end of the step.
"""

import socket
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmtrain.distributed.collectives import all_gather_floats, barrier, gather_objects


@dataclass
class StragglerReport:
    """One probed step: per-rank (step, compute, wait) seconds, hosts, and the ranks named."""

    data_step: int
    split: list[tuple[float, float, float]]
    hosts: list[str]
    stragglers: list[int]
    median_compute: float

    def metrics(self) -> dict[str, float]:
        """Per-rank metrics a dashboard can plot (one series per rank and quantity)."""
        out: dict[str, float] = {}
        for r, (step_s, compute_s, wait_s) in enumerate(self.split):
            out[f"straggler/step_s/rank_{r}"] = step_s
            out[f"straggler/compute_s/rank_{r}"] = compute_s
            out[f"straggler/wait_s/rank_{r}"] = wait_s
        return out

    def details(self, threshold: float) -> dict[str, Any]:
        """The event's details: the named ranks only (the full split goes to MLflow)."""
        return {
            "ranks": self.stragglers,
            "hosts": [self.hosts[r] for r in self.stragglers],
            "compute_s": [round(self.split[r][1], 4) for r in self.stragglers],
            "wait_s": [round(self.split[r][2], 4) for r in self.stragglers],
            "median_compute_s": round(self.median_compute, 4),
            "threshold": threshold,
            "data_step": self.data_step,
        }


def name_stragglers(compute: list[float], threshold: float) -> tuple[list[int], float]:
    """Ranks whose compute time exceeds the median by more than `threshold` (a fraction), and the median."""
    median = statistics.median(compute)
    return [r for r, c in enumerate(compute) if c > median * (1 + threshold)], median


class _Marks:
    """Clock readings the hooks take during a probed step."""

    def __init__(self) -> None:
        self.grads_ready: float | None = None
        self.sync_done: float | None = None

    def grad(self, _p: torch.Tensor) -> None:
        self.grads_ready = time.perf_counter()

    def step(self, *_args: Any) -> None:
        if self.sync_done is None:
            self.sync_done = time.perf_counter()


class StragglerProbe:
    """Owned by `Resilience`; `measure(data_step)` wraps the engine's step on every rank."""

    def __init__(self, every: int, threshold: float, modules: list[nn.Module], optimizer: Any) -> None:
        self.every, self.threshold = every, threshold
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        self.hosts: list[str] | None = None
        self.report: StragglerReport | None = None
        self.cost_s = 0.0

    def due(self, data_step: int) -> bool:
        """Probe this step? Decided from the data step, which every rank agrees on."""
        return self.every > 0 and torch.distributed.is_initialized() and (data_step + 1) % self.every == 0

    @contextmanager
    def measure(self, data_step: int) -> Iterator[None]:
        """Around one engine step: align, time, split, gather (a no-op on steps not due)."""
        if not self.due(data_step):
            yield
            return
        if self.hosts is None:  # once: the hosts do not change during a run
            self.hosts = gather_objects(socket.gethostname())
        c0 = time.perf_counter()
        marks = _Marks()
        handles = [p.register_post_accumulate_grad_hook(marks.grad) for p in self.params]
        if self.optimizer is not None:
            handles.append(self.optimizer.register_step_pre_hook(marks.step))
        barrier()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            for h in handles:
                h.remove()
        ready = marks.grads_ready if marks.grads_ready is not None else end
        done = marks.sync_done if marks.sync_done is not None else end
        wait = max(0.0, done - ready)
        rows = all_gather_floats([end - t0, end - t0 - wait, wait])
        split = [(r[0], r[1], r[2]) for r in rows]
        named, median = name_stragglers([s[1] for s in split], self.threshold)
        self.report = StragglerReport(data_step, split, self.hosts, named, median)
        self.cost_s = time.perf_counter() - end + t0 - c0  # the probe's own time (bench/stragglers.py)

    def take(self) -> StragglerReport | None:
        """The report of the step just probed (once), else None."""
        report, self.report = self.report, None
        return report
