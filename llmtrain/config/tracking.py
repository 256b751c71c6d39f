"""Experiment tracking schema (MLflow on rank 0, plus the console line)."""

from dataclasses import dataclass, field

TRACKING_BACKENDS = ("mlflow", "none")


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow destination and what is sent there."""

    backend: str = "mlflow"
    """mlflow or none (console only)."""
    uri: str | None = None
    """Tracking URI; None = $MLFLOW_TRACKING_URI or sqlite under the runs folder."""
    experiment: str = "llmtrain"
    """MLflow experiment name."""
    system_metrics: bool = True
    """Log CPU/RAM (and GPU) utilisation alongside training metrics."""
    system_metrics_every_s: float = 10.0
    """Seconds between system metric samples."""
    flush_every_s: float = 2.0
    """Seconds between background batched uploads."""
    max_buffer: int = 100_000
    """Metric points held in memory while the server is unreachable before spilling to disk."""
    log_model: bool = False
    """Upload the final model (HF safetensors export of the last checkpoint) as run artifact "model"."""
    request_timeout_s: int = 10
    """Seconds before an MLflow HTTP request counts as failed (the uploader then buffers and retries)."""
    parent_run: str | None = None
    """Nest the run under a parent run of this name (set by the CLI for Hydra multirun sweeps)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra run tags."""
