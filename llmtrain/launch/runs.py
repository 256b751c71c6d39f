"""Where runs stand: SLURM job records in run folders, job states, last checkpoint, MLflow link.

Every SLURM submission appends one JSON line to `<run_dir>/slurm/jobs.jsonl` (job id, sweep id, log
paths). A run folder therefore knows its jobs, and a sweep is the set of run folders whose records
carry the same sweep id. `tools/runs.py` is the command-line face of this module.
"""

import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

JOBS_FILE = "jobs.jsonl"
ACTIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
     "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
)  # fmt: skip


@dataclass
class JobRecord:
    """One submission of a run (a requeue keeps the job id, so it adds no record)."""

    job_id: str
    run_name: str
    run_dir: str
    sweep: str | None
    submitted_at: float
    stdout: str
    stderr: str


def record_job(rec: JobRecord, slurm_dir: Path) -> None:
    slurm_dir.mkdir(parents=True, exist_ok=True)
    with open(slurm_dir / JOBS_FILE, "a") as f:
        f.write(json.dumps(asdict(rec)) + "\n")


def job_records(run_dir: Path) -> list[JobRecord]:
    """All submissions of a run, oldest first (records live in <run_dir>/slurm or a custom logs dir)."""
    out = []
    for path in sorted(run_dir.glob(f"slurm/{JOBS_FILE}")):
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(JobRecord(**json.loads(line)))
    return sorted(out, key=lambda r: r.submitted_at)


def find_runs(root: Path, sweep: str | None = None) -> list[Path]:
    """Run folders under root that were submitted to SLURM (optionally: members of one sweep)."""
    runs = []
    for jobs in sorted(root.glob(f"*/slurm/{JOBS_FILE}")):
        run_dir = jobs.parent.parent
        if sweep is None or any(r.sweep == sweep for r in job_records(run_dir)):
            runs.append(run_dir)
    return runs


def _run(cmd: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def job_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state per job id: sacct when accounting works, else squeue/scontrol (recent jobs only)."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    out = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,State"])
    if out is not None and out.returncode == 0:
        for line in out.stdout.splitlines():
            jid, _, state = line.partition("|")
            if jid in job_ids and state:
                states[jid] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    for jid in set(job_ids) - set(states):
        out = _run(["scontrol", "show", "job", "-o", jid])
        if out is not None and out.returncode == 0 and "JobState=" in out.stdout:
            states[jid] = out.stdout.split("JobState=", 1)[1].split()[0]
    return {jid: states.get(jid, "UNKNOWN") for jid in job_ids}


def wait_for_state(job_id: str, done: frozenset[str] | None = None, timeout_s: float = 120.0) -> str:
    """Poll until the job leaves the active states (or reaches one of `done`); return the state."""
    deadline = time.monotonic() + timeout_s
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        state = job_states([job_id])[job_id]
        if (done is not None and state in done) or (
            done is None and state not in ACTIVE_STATES | {"UNKNOWN"}
        ):
            return state
        time.sleep(0.5)
    raise TimeoutError(f"SLURM job {job_id} still {state} after {timeout_s:.0f}s")


def cancel_run(run_dir: Path) -> list[str]:
    """scancel the run's jobs that are still active; return the cancelled ids."""
    ids = [r.job_id for r in job_records(run_dir)]
    active = [j for j, s in job_states(ids).items() if s in ACTIVE_STATES]
    if active:
        out = _run(["scancel", *active])
        if out is None or out.returncode != 0:
            raise RuntimeError(
                f"scancel {' '.join(active)} failed: {out.stderr.strip() if out else 'timeout'}"
            )
    return active


def mlflow_link(run_dir: Path) -> str | None:
    """A URL (tracking server) or a `mlflow ui` hint (local store) for the run's MLflow run."""
    from llmtrain.tracking.tracker import RUN_ID_FILE

    id_file = run_dir / RUN_ID_FILE
    if not id_file.is_file():
        return None
    run_id = id_file.read_text().strip()
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_dir / "config.yaml")
        uri = cfg.tracking.uri
        if not uri:
            from llmtrain.tracking.mlflow_logger import default_uri

            uri = default_uri(cfg.run.root)
    except Exception:
        return f"run {run_id}"
    if str(uri).startswith("http"):
        try:
            from mlflow.tracking import MlflowClient

            exp = MlflowClient(uri).get_run(run_id).info.experiment_id
            return f"{str(uri).rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
        except Exception:
            return f"{uri} run {run_id}"
    from llmtrain.tracking.commands import mlflow_ui_command

    return f"run {run_id} (open the UI: {mlflow_ui_command(str(uri))})"


def training_log(run_dir: Path, last: JobRecord | None) -> str | None:
    """The file holding the training output: rank 0's SLURM stderr (the log lines go to stderr; prints
    to the .out file) for a SLURM run, else the run folder's own `train.log` (written by rank 0)."""
    from llmtrain.tracking.tracker import LOG_FILE

    if last is not None:
        return str(Path(last.stderr).absolute())
    local = run_dir / LOG_FILE
    return str(local.absolute()) if local.is_file() else None


def run_status(run_dir: Path, with_mlflow: bool = True) -> dict[str, Any]:
    """Last job and its state, newest complete checkpoint, last logged step and loss, MLflow link."""
    from llmtrain.checkpoint import list_checkpoints

    recs = job_records(run_dir)
    last = recs[-1] if recs else None
    ckpts = list_checkpoints(run_dir / "checkpoints")
    entry: dict[str, Any] = {}
    log_file = run_dir / "train_log.jsonl"
    if log_file.is_file():
        lines = [ln for ln in log_file.read_text().splitlines() if ln.strip()]
        entry = json.loads(lines[-1]) if lines else {}
    cfg_steps = None
    if (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        cfg_steps = OmegaConf.load(run_dir / "config.yaml").trainer.max_steps
    return {
        "run": run_dir.name,
        "run_dir": str(run_dir.absolute()),
        "job_id": last.job_id if last else None,
        "state": job_states([last.job_id])[last.job_id] if last else None,
        "sweep": last.sweep if last else None,
        "stdout": last.stdout if last else None,
        "log": training_log(run_dir, last),
        "checkpoint": str(ckpts[-1][1]) if ckpts else None,
        "checkpoint_step": ckpts[-1][0] if ckpts else None,
        "step": entry.get("step"),
        "max_steps": cfg_steps,
        "loss": entry.get("loss"),
        "mlflow": mlflow_link(run_dir) if with_mlflow else None,
    }
