"""The per-step policy: decide inside the step (before the optimizer step) whether to skip it, then
count, log, roll back or stop after it (docs/resilience.md)."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain.config.errors import ConfigError
from llmtrain.config.resilience import ResilienceConfig
from llmtrain.data.loader import Batch
from llmtrain.parallel.engine import Engine
from llmtrain.parallel.step import StepResult
from llmtrain.resilience.events import EventLog
from llmtrain.resilience.faults import injected_fault
from llmtrain.resilience.inject import scaled_outputs, slowed
from llmtrain.resilience.rollback import roll_back
from llmtrain.resilience.spikes import SpikeDetector
from llmtrain.resilience.stragglers import StragglerProbe
from llmtrain.resilience.timeline import START
from llmtrain.tracking import ConsoleLogger


class ResilienceStop(RuntimeError):
    """resilience.<kind>=stop fired (or a rollback found no checkpoint): the run ends with the reason."""


def refuse_skip(cfg: ResilienceConfig, kind: str) -> None:
    """`skip` on an engine whose step cannot be skipped would apply the bad step and train on: a NaN
    step leaves NaN in Adam's moments for good, so the run is lost while it looks alive. Every built-in
    engine skips; an engine that cannot is refused at start, before any step, naming the keys."""
    keys = [f"resilience.{k}=skip" for k in ("nonfinite", "spike") if getattr(cfg, k) == "skip"]
    if keys:
        raise ConfigError(
            f"{' and '.join(keys)}: parallel.backend={kind} cannot skip an optimizer step "
            "(Engine.set_skip_when returned False); choose one of: warn, rollback, stop"
        )


@dataclass
class Pending:
    """What the guard saw in the step just run (kind, action, details)."""

    kind: str
    action: str
    details: dict[str, Any] = field(default_factory=dict)


class Resilience:
    """Owns the spike detector, the consecutive-skip count and the event log of one rank.

    `guard(loss, grad_norm)` runs inside the engine's step on every rank with the global loss and grad
    norm (already identical everywhere), so all ranks take the same decision without a collective.
    """

    def __init__(
        self, cfg: ResilienceConfig, engine: Engine, console: ConsoleLogger, run_dir: Path, rank: int
    ) -> None:
        self.cfg, self.engine, self.rank = cfg, engine, rank
        self.spikes = SpikeDetector(cfg.spike_window, cfg.spike_threshold, cfg.spike_warmup)
        self.events = EventLog(run_dir, rank == 0, console)
        self.pending: Pending | None = None
        self.consecutive, self.data_step = 0, 0
        self.stragglers = StragglerProbe(
            cfg.straggler_every, cfg.straggler_threshold, engine.modules, getattr(engine, "optimizer", None)
        )
        self.slow_s = cfg.inject_slow_s if rank == cfg.inject_slow_rank else 0.0
        wanted = any(a != "warn" for a in (cfg.nonfinite, cfg.spike))
        self.in_step = wanted and engine.set_skip_when(self.guard)
        if wanted and not self.in_step:
            refuse_skip(cfg, engine.kind)
            console.warning(
                f"parallel.backend={engine.kind} cannot skip an optimizer step: resilience.nonfinite="
                f"{cfg.nonfinite} and resilience.spike={cfg.spike} act after the step (rollback and "
                "stop still apply)"
            )

    def guard(self, loss: float, grad_norm: float) -> bool:
        """Classify the step (non-finite, spike, fine); True = skip its optimizer step."""
        details = {"loss": loss, "grad_norm": grad_norm}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.pending = Pending("nonfinite", self.cfg.nonfinite, details)
            return self.cfg.nonfinite != "warn"
        spike, z = self.spikes.is_spike(loss)
        if spike:
            self.pending = Pending("spike", self.cfg.spike, details | {"z": round(z, 2)})
            if self.cfg.spike != "warn":
                return True
        self.spikes.accept(loss)
        return False

    def train_step(self, batches: list[Batch], lr: float, loader: Any) -> StepResult:
        """The engine's step, with the test hooks' fault on rank 0 when the data step (index of the
        global batch just drawn from `loader`, counted over the whole run) is listed."""
        data_step = self.data_step = loader.consumed // loader.global_batch - 1
        factor = None
        if self.rank == 0 and data_step in self.cfg.inject_nan_steps:
            factor = math.nan
        elif self.rank == 0 and data_step in self.cfg.inject_spike_steps:
            factor = self.cfg.inject_spike_factor
        last = self.engine.modules[-1:]
        with (
            scaled_outputs(last, factor),
            injected_fault(self.cfg, self.rank, data_step, last),
            slowed(self.engine.modules[:1], self.slow_s),
            self.stragglers.measure(data_step),
        ):
            res = self.engine.train_step(batches, lr)
        if not self.in_step:  # warn-only: observe after the step
            self.guard(res.loss, res.grad_norm)
        return res

    def handle(self, trainer: Any, res: StepResult) -> bool:
        """After the step: log the event, apply its action. True when the step was skipped (the
        trainer then does not advance, nor record it). `trainer` is the llmtrain.train Trainer."""
        self.report_stragglers(trainer)
        START.first_step(trainer.run_dir, self.rank == 0, trainer.step)
        event, self.pending = self.pending, None
        if event is None:
            self.consecutive = 0
            return False
        self.consecutive = self.consecutive + 1 if event.action != "warn" else 0
        self.events.counts["skipped_steps"] += int(res.skipped)
        details = event.details | {"data_step": self.data_step, "consecutive_skips": self.consecutive}
        self.events.emit(trainer.step, event.kind, event.action, details, trainer.tracker)
        if event.action == "stop":
            raise ResilienceStop(
                f"resilience.{event.kind}=stop: {event.kind} at step {trainer.step} "
                f"(loss {res.loss}, grad norm {res.grad_norm}); the last checkpoint is intact"
            )
        if event.action == "rollback" and self.consecutive >= self.cfg.rollback_after:
            from_step = trainer.step
            trainer.watchdog.between_steps()  # the checkpoint load gets the start-up allowance
            info = roll_back(trainer)
            self.consecutive = 0
            self.events.emit(from_step, "rollback", "rollback", info, trainer.tracker)
        return res.skipped

    def report_stragglers(self, trainer: Any) -> None:
        """After a probed step: per-rank step/compute/wait metrics to MLflow, and an event naming the
        stragglers (console, events.jsonl) when there are any."""
        report = self.stragglers.take()
        if report is None:
            return
        if trainer.tracker is not None:
            trainer.tracker.log_metrics(report.metrics(), trainer.step)
        if report.stragglers:
            details = report.details(self.cfg.straggler_threshold)
            self.events.emit(trainer.step, "straggler", "warn", details, trainer.tracker)
