"""Resilience schema: what a non-finite loss/gradient or a loss spike does to the run (docs/resilience.md)."""

from dataclasses import dataclass, field

ACTIONS = ("warn", "skip", "rollback", "stop")
"""warn: log and train on; skip: skip the optimizer step; rollback: skip, and after
`rollback_after` consecutive skips reload the last checkpoint and skip the data since it; stop: skip and
end the run with the reason."""


@dataclass(kw_only=True)
class ResilienceConfig:
    """Per-event policies, the spike detector, and test hooks that inject faults."""

    nonfinite: str = "skip"
    """Action on a NaN/inf global loss or gradient norm: warn | skip | rollback | stop."""
    spike: str = "warn"
    """Action on a loss spike (robust z-score above spike_threshold): warn | skip | rollback | stop."""
    rollback_after: int = 3
    """Consecutive skipped steps that trigger the rollback (action rollback)."""
    spike_window: int = 50
    """Recent (accepted) losses the spike detector's median and MAD are taken over."""
    spike_threshold: float = 6.0
    """Robust z-score (loss - median) / (1.4826 MAD) above which a loss is a spike."""
    spike_warmup: int = 20
    """Accepted losses seen before the detector may flag anything (early losses fall fast)."""
    inject_nan_steps: list[int] = field(default_factory=list)
    """Test hook: data steps (0-based global batches of the run) whose loss rank 0 turns into NaN."""
    inject_spike_steps: list[int] = field(default_factory=list)
    """Test hook: data steps whose model output rank 0 multiplies by inject_spike_factor."""
    inject_spike_factor: float = 50.0
    """Test hook: the output multiplier of inject_spike_steps."""
    straggler_every: int = 100
    """Measure every rank's step time (compute vs. waiting in collectives) every N steps (0: off)."""
    straggler_threshold: float = 0.2
    """A rank whose compute time exceeds the median's by more than this fraction is a straggler."""
    inject_slow_rank: int = -1
    """Test hook: this rank sleeps inject_slow_s in every forward (its compute), -1: none."""
    inject_slow_s: float = 0.0
    """Test hook: seconds inject_slow_rank sleeps per forward."""
