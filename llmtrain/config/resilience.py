"""Resilience schema: what a non-finite loss/gradient, a loss spike, a hang or a crashed rank does to the
run (docs/resilience.md)."""

from dataclasses import dataclass, field

ACTIONS = ("warn", "skip", "rollback", "stop")
"""warn: log and train on; skip: skip the optimizer step; rollback: skip, and after
`rollback_after` consecutive skips reload the last checkpoint and skip the data since it; stop: skip and
end the run with the reason."""


@dataclass(kw_only=True)
class ResilienceConfig:
    """Per-event policies, the spike detector, process-group timeouts, the hang watchdog, in-job restarts,
    and test hooks that inject faults."""

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
    # -- hangs and crashes (docs/resilience.md "Hangs" and "In-job restart") --
    pg_timeout_s: float = 600.0
    """Timeout of every process group (the default one, device-mesh dims, helper groups): a collective
    waiting longer raises. Replaces torch's silent 30 min; keep above hang_max_s so the watchdog,
    which writes diagnostics, fires first."""
    hang_watchdog: bool = True
    """Per-rank thread that ends the job when no step finishes within its deadline."""
    hang_factor: float = 10.0
    """Deadline of a step: hang_factor x the median of the recent step times, within [hang_min_s, hang_max_s]."""
    hang_min_s: float = 60.0
    """Floor of the step deadline (tiny steps still get time for a hiccup: a GC pause, a busy node)."""
    hang_max_s: float = 480.0
    """Ceiling of the step deadline (must stay below pg_timeout_s)."""
    hang_startup_s: float = 600.0
    """Deadline at start-up (engine build, resume), of the steps before one was timed, and between steps
    (saves, validation)."""
    hang_warmup_steps: int = 3
    """First steps left out of the step times (they compile and warm up); they get hang_startup_s."""
    heartbeat_s: float = 5.0
    """Each rank writes its step to the rendezvous store this often; a rank whose heartbeat does not change
    for 2 x heartbeat_s is named as stopped when the watchdog fires."""
    max_restarts: int = 0
    """In-job restarts after a rank crash or a watchdog exit (launcher=local/torchrun/slurm; on SLURM the
    job then runs one node agent per node, inside the same allocation): all ranks restart from the newest
    complete checkpoint in the same run folder and MLflow run; the ranks are then forks of a server that
    imported torch and the trainer once (a restart does not import them again). 0: a failure ends the job."""
    crash_loop_after: int = 2
    """The same step failing this many times in a row ends the job (exit code 76) instead of restarting."""
    inject_fault: list[str] = field(default_factory=list)
    """Test hook: what rank inject_fault_rank does in the forward of data step inject_fault_step, per
    attempt of the job in order (the first start, then each in-job restart): none | sigstop | sigkill |
    exit (os._exit(1)); attempts past the end of the list run clean. [sigstop, sigkill]: a hang, then a
    crash, then a clean third attempt."""
    inject_fault_rank: int = 1
    """Test hook: the rank inject_fault hits."""
    inject_fault_step: int = 0
    """Test hook: the data step (0-based global batch of the run) inject_fault hits."""
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
