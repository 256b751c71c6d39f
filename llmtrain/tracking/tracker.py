"""The trainer-facing tracking facade: no-op on non-zero ranks and with tracking=none."""

import json
import logging
import socket
import subprocess
from pathlib import Path
from typing import Any

from llmtrain.config.io import to_dict
from llmtrain.config.schema import Config
from llmtrain.tracking.mlflow_logger import MLflowLogger, default_uri, flatten

log = logging.getLogger("llmtrain")
RUN_ID_FILE = "mlflow_run_id.txt"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Forwards to MLflow on rank 0 when enabled; remembers the run id in the run folder."""

    def __init__(
        self, cfg: Config, run_dir: Path, is_main: bool, run_id: str | None, tags: dict[str, str]
    ) -> None:
        self.mlflow: MLflowLogger | None = None
        if not is_main or cfg.tracking.backend == "none":
            return
        id_file = run_dir / RUN_ID_FILE
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        uri = cfg.tracking.uri or default_uri(cfg.run.root)
        self.mlflow = MLflowLogger(
            uri, cfg.tracking.experiment, cfg.run.name, run_id, cfg.tracking.flush_every_s
        )
        id_file.write_text(self.mlflow.run_id)
        if run_id is None:
            self.mlflow.log_params(flatten(to_dict(cfg)))
        base = {"git_commit": git_commit(), "hostname": socket.gethostname(), **cfg.tracking.tags, **tags}
        self.mlflow.set_tags(base)
        log.info("mlflow run %s at %s", self.mlflow.run_id, uri)

    @property
    def run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step)

    def log_checkpoint(self, step: int, path: Path, size_bytes: int) -> None:
        if self.mlflow:
            self.mlflow.log_metrics({"checkpoint/size_gb": size_bytes / 1e9}, step)
            self.mlflow.set_tags({"checkpoint/latest": json.dumps({"step": step, "path": str(path)})})

    def finish(self, status: str = "FINISHED") -> None:
        if self.mlflow:
            self.mlflow.finish(status)

    def describe(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": self.mlflow.uri if self.mlflow else None}
