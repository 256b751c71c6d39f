"""The trainer-facing tracking facade: no-op on non-zero ranks and with tracking=none.

Only rank 0 talks to MLflow. One run folder is one MLflow run: the run id comes from the checkpoint,
else from `<run_dir>/mlflow_run_id.txt`; a requeued or resumed job continues that run. Every end of
a job sets the run's status: FINISHED, KILLED (a stop signal, Ctrl-C) or FAILED (any exception,
from the resume on; see `ends_run_on_error`), so no run stays RUNNING after its job is gone.
Rank 0 also keeps the job's log lines in `<run_dir>/train.log` (what `tools/runs.py status` shows).
"""

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmtrain.config.io import to_dict
from llmtrain.config.schema import Config
from llmtrain.tracking.mlflow_logger import (
    RUN_ID_FILE,
    MLflowLogger,
    default_uri,
    read_delivery_state,
    write_delivery_state,
)
from llmtrain.tracking.params import flatten, is_secret_key, redact_url
from llmtrain.tracking.records import shorten
from llmtrain.tracking.system import SystemSampler

log = logging.getLogger("llmtrain")
__all__ = ["LOG_FILE", "RUN_ID_FILE", "Tracker", "ends_run_on_error", "git_commit", "run_tags"]
LOG_FILE = "train.log"
DELETED_TAG = "deleted (retention)"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def artifact_root(uri: str, runs_root: str | Path) -> str | None:
    """Local stores keep artifacts beside the runs (MLflow would use ./mlruns of the cwd); a server
    decides for itself."""
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return (Path(runs_root).resolve() / "mlartifacts").as_uri()
    return None


def export_model(checkpoint: Path) -> tuple[Path, str]:
    """The final model as a Hugging Face folder (tools/export_hf.py) to upload as artifact "model";
    the raw checkpoint folder ("checkpoint/<step>") when the export is not possible for this model."""
    out = checkpoint.parent.parent / "export_hf"
    try:
        from llmtrain.checkpoint.convert import export_hf

        return export_hf(checkpoint, out), "model"
    except Exception as e:
        log.warning(
            "mlflow: HF export of %s failed (%s); logging the checkpoint folder instead", checkpoint, e
        )
        return checkpoint, f"checkpoint/{checkpoint.name}"


def run_tags(trainer: Any) -> dict[str, str]:
    """Tags describing where a trainer runs; `slurm_job_id` only inside a SLURM job (no empty tag)."""
    tags = {
        "world_size": str(trainer.env.world_size),
        "layout": trainer.dims.describe(),
        "engine": trainer.cfg.parallel.backend,
    }
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    pin = getattr(trainer, "init_pin", None)
    if pin is not None:  # the exact base checkpoint of a fine-tuning run
        tags["init_from"] = pin.describe()
    return tags


@contextlib.contextmanager
def ends_run_on_error(trainer: Any) -> Iterator[None]:
    """Around `Trainer.train`: an exception ends the MLflow run FAILED (KeyboardInterrupt/SystemExit:
    KILLED) with the error as tag `llmtrain.error`, then propagates. An error before the tracker
    exists (in the resume) still opens the run folder's run (or creates it), so the failed job shows."""
    try:
        yield
    except BaseException as e:
        tracker = trainer.__dict__.get("tracker")
        try:
            if tracker is None:
                tracker = Tracker(
                    trainer.cfg, trainer.run_dir, trainer.env.is_main, None, run_tags(trainer), trainer.step
                )
                trainer.tracker = tracker
            tracker.fail(e)
        except Exception as inner:  # never hide the training error behind a tracking one
            log.warning("mlflow: could not mark the run as ended by %s: %s", type(e).__name__, shorten(inner))
        raise


def _step_dirs(paths: Iterable[Path]) -> Iterator[re.Match[str]]:
    """Matches for complete checkpoint folders `step_<N>` among `paths` (not leftovers of saves)."""
    for p in paths:
        m = _STEP_DIR.match(Path(p).name)
        if m:
            yield m


_LOG_FILE_HANDLER: list[logging.Handler] = []  # one training per process: the current run's log file


def _attach_log_file(path: Path) -> None:
    """Append rank 0's `llmtrain` log lines to `path` (the local runs' log; SLURM has its own too) from
    now until the process ends or the next run of this process starts (the summary after the run's
    end goes there too)."""
    logger = logging.getLogger("llmtrain")
    for old in _LOG_FILE_HANDLER:
        logger.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    _LOG_FILE_HANDLER[:] = [handler]


class Tracker:
    """Forwards metrics, tags and checkpoints to MLflow on rank 0 when enabled."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        is_main: bool,
        run_id: str | None,
        tags: dict[str, str],
        start_step: int = 0,
    ) -> None:
        self.mlflow: MLflowLogger | None = None
        self.sampler: SystemSampler | None = None
        self.step, self.closed = start_step, False
        tc = cfg.tracking
        self.log_model = tc.log_model
        if not is_main:
            return
        run_dir = Path(run_dir)
        if run_dir.is_dir():
            _attach_log_file(run_dir / LOG_FILE)
        if tc.backend == "none":
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / RUN_ID_FILE
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        resume_tag = self._count_job(run_dir, start_step)
        uri = tc.uri or default_uri(cfg.run.root)
        self.mlflow = MLflowLogger(
            uri,
            run_dir,
            experiment=tc.experiment,
            run_name=cfg.run.name,
            run_id=run_id,
            flush_every_s=tc.flush_every_s,
            max_buffer=tc.max_buffer,
            request_timeout_s=tc.request_timeout_s,
            parent_run=tc.parent_run,
            artifact_location=artifact_root(uri, cfg.run.root),
        )
        if run_id is None:  # a new run (or one whose creation is still pending): record the config once
            self.mlflow.log_params(flatten(to_dict(cfg)))
        commit = git_commit()
        self.mlflow.set_tags(
            {
                "git_commit": commit,
                "mlflow.source.git.commit": commit,
                "hostname": socket.gethostname(),
                **{k: v for k, v in tc.tags.items() if not is_secret_key(k)},
                **tags,
                **resume_tag,
            }
        )
        if tc.system_metrics:
            self.sampler = SystemSampler(
                self.mlflow.log_metrics, tc.system_metrics_every_s, lambda: self.step
            )
            self.sampler.start()
        log.info("mlflow run %s at %s", self.mlflow.run_id or "(pending)", redact_url(uri))

    @staticmethod
    def _count_job(run_dir: Path, start_step: int) -> dict[str, str]:
        """Number the jobs of this run folder and say, in a tag, where this one started."""
        state = read_delivery_state(run_dir)
        last = int(state.get("last_step", -1))
        if last < 0 and start_step == 0:
            return {}
        state["jobs"] = int(state.get("jobs", 1)) + 1
        write_delivery_state(run_dir, state)
        note = f"job {state['jobs']} started at step {start_step} on {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        if last > start_step:
            note += f"; steps {start_step + 1}..{last} were logged by an earlier job and are not logged again"
        return {f"llmtrain.resume.{state['jobs']}": note, "llmtrain.jobs": str(state["jobs"])}

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None while a run could not be created yet, or with tracking off)."""
        return self.mlflow.run_id if self.mlflow else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics for `step` (returns at once; the upload thread sends them)."""
        if self.mlflow:
            self.step = max(self.step, step)
            self.mlflow.log_metrics(metrics, step)

    def log_checkpoint(self, step: int, path: Path, size_bytes: int, deleted: Iterable[Path] = ()) -> None:
        """Record a saved checkpoint: size as a metric at its step, path and size as tags. `deleted`:
        the checkpoint folders retention removed with this save; their `checkpoint.step_<N>` tags
        are set to "deleted (retention)" so no tag points at a folder that is gone."""
        if self.mlflow:
            info = json.dumps({"step": step, "path": str(path), "size_bytes": size_bytes})
            self.mlflow.log_metrics({"checkpoint/size_gb": size_bytes / 1e9}, step)
            gone = {f"checkpoint.step_{int(m.group(1))}": DELETED_TAG for m in _step_dirs(deleted)}
            self.mlflow.set_tags({**gone, f"checkpoint.step_{step}": info, "checkpoint.latest": info})

    def finish(self, status: str = "FINISHED", model_dir: Path | None = None) -> None:
        """Flush, upload `model_dir` (the final checkpoint) as an artifact when tracking.log_model is
        set, close the run with `status` (once: a second call does nothing)."""
        if self.closed:
            return
        self.closed = True
        if self.sampler:
            self.sampler.stop()
        if self.mlflow:
            if self.log_model and model_dir is not None:
                folder, name = export_model(Path(model_dir))
                self.mlflow.log_artifacts(folder, name)
            elif self.log_model and status == "FINISHED":
                log.warning("tracking.log_model=true but no checkpoint was saved (checkpoint.enabled?)")
            self.mlflow.finish(status)

    def fail(self, exc: BaseException) -> str:
        """End the run because of `exc`: KILLED for KeyboardInterrupt/SystemExit, else FAILED; the
        error goes to tag `llmtrain.error`. No model upload. Returns the status set."""
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        if self.mlflow and not self.closed:
            self.mlflow.set_tags({"llmtrain.error": shorten(f"{type(exc).__name__}: {exc}", 1000)})
            log.info("mlflow run %s ended %s (%s)", self.run_id or "(pending)", status, type(exc).__name__)
        self.finish(status)
        return status

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        """Upload a folder (e.g. a profiler trace) to the run, in the background."""
        if self.mlflow:
            self.mlflow.log_artifacts(Path(folder), artifact_path)

    def describe(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": redact_url(self.mlflow.uri) if self.mlflow else None}
