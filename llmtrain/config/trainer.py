"""Training-loop schema: batch sizes, step budget, precision, logging and validation cadence."""

from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


@dataclass(kw_only=True)
class TrainerConfig:
    """Batch geometry and loop cadence. Gradient accumulation is derived, never set by hand."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    global_batch_size: int = 32
    """Sequences per optimizer step, over all data-parallel ranks and microbatches."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; accumulation = global / (micro * dp)."""
    seed: int = 42
    """Seed for weight init and every other random choice in the run."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    precision: str = "fp32"
    """Autocast dtype for forward/backward: fp32 or bf16 (parameters stay fp32)."""
    deterministic: bool = True
    """Use deterministic algorithms so that resumed runs reproduce losses bitwise on CPU."""
    num_threads: int | None = None
    """torch intra-op threads per rank; None = cores / local ranks."""
    log_every: int = 10
    """Console/MLflow metrics every N steps."""
    val_every: int = 0
    """Validation loss/perplexity every N steps (0 = only at the end when a val split exists)."""
    val_batches: int = 8
    """Micro-batches per validation pass (per data-parallel rank)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU; None = looked up from the device table."""
    profile: bool = False
    """Capture a torch profiler trace of a window of steps into the run folder."""
    profile_start: int = 5
    """First profiled step."""
    profile_steps: int = 3
    """Number of profiled steps."""
