"""The `llmtrain` command end to end in subprocesses: 2-rank run, config inspection, multirun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=128",
    "data.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_size=16",
    "trainer.log_every=5",
    "trainer.val_every=10",
    "trainer.val_batches=2",
    "optim.warmup_steps=3",
    "optim.lr=3e-3",
]


def _cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parent.parent)  # this checkout, not whatever is pip-installed
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_two_rank_run_trains_checkpoints_and_tracks(shakespeare_dir, tmp_path):
    out = _cli(
        [
            *TINY,
            f"data.sources.0.path={shakespeare_dir}",
            f"run.root={tmp_path / 'runs'}",
            "run.name=e2e",
            "launcher.nproc=2",
            "trainer.max_steps=20",
            "checkpoint.every_steps=10",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "e2e"
    losses = _losses(run_dir)
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5
    assert "[rank0]" in out.stderr + out.stdout and "tok/s" in out.stderr + out.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]
    assert (run_dir / "config.yaml").is_file()
    # the embedded MLflow store received the run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    hist = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in hist] == [5, 10, 15, 20]
    assert hist[-1].value == pytest.approx(losses[-1])


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = _cli(["--cfg", "job", "model=1b", "parallel=zero3"], tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dim: 2048" in out.stdout and "zero_stage: 3" in out.stdout


def test_multirun_creates_sibling_runs(shakespeare_dir, tmp_path):
    out = _cli(
        [
            "-m",
            *TINY,
            f"data.sources.0.path={shakespeare_dir}",
            f"run.root={tmp_path / 'runs'}",
            "tracking=none",
            "trainer.max_steps=3",
            "checkpoint.enabled=false",
            "optim.lr=1e-3,3e-3",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if (p / "train_log.jsonl").is_file())
    assert runs == ["default-optim.lr=0.001", "default-optim.lr=0.003"]
    a, b = (_losses(tmp_path / "runs" / r) for r in runs)
    assert a[0] == b[0] and a[-1] != b[-1]  # same start, different learning rates


def test_a_config_error_writes_nothing(tmp_path):
    """A rejected config leaves no trace: no run folder, no Hydra folder or log file (it created
    <run>/hydra/cli.log before)."""
    res = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", f"run.root={tmp_path / 'runs'}", "optim.schedule=nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "optim.schedule='nope'" in res.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


@pytest.mark.distributed
def test_bad_data_on_two_ranks_is_one_line_and_exit_2(shakespeare_dir, tmp_path):
    import shutil

    data = tmp_path / "damaged"
    shutil.copytree(shakespeare_dir, data)
    shard = sorted(data.glob("shard_*.arrow"))[-1]
    with open(shard, "r+b") as f:  # one byte short of what index.json records
        f.truncate(shard.stat().st_size - 1)
    out = _cli(
        [
            *TINY,
            f"data.sources.0.path={data}",
            f"run.root={tmp_path / 'runs'}",
            "tracking=none",
            "launcher.nproc=2",
            "trainer.max_steps=3",
        ],
        tmp_path,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("llmtrain")]
    assert errors == [
        f"llmtrain: data error: {shard}: {shard.stat().st_size} bytes but index.json says "
        f"{shard.stat().st_size + 1} (truncated or replaced?)"
    ], out.stderr[-3000:]
    assert "ChildFailedError" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["objective=sft", "objective.sft.train_path={tmp}/missing.jsonl"],
            "llmtrain: data error: objective.sft: data file {tmp}/missing.jsonl does not exist",
        ),
        (
            ["objective=sft", "objective.sft.train_path={tmp}/bad.jsonl"],
            "llmtrain: data error: {tmp}/bad.jsonl:2: expected a JSON object",
        ),
        (
            ["objective=distill", "objective.distill.teacher={tmp}/no-teacher"],
            "llmtrain: config error: objective.distill.teacher: {tmp}/no-teacher: no complete llmtrain checkpoint",
        ),
    ],
    ids=["sft-missing", "sft-malformed", "teacher-missing"],
)
def test_objective_inputs_are_checked_before_any_rank_starts(shakespeare_dir, tmp_path, overrides, needle):
    """A missing or malformed SFT file or teacher was found only on the ranks (a traceback per rank and
    torchrun's dump, exit 1); the launcher finds it: one line, exit 2, nothing written."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    runs = tmp_path / "runs"
    args = [*TINY, f"data.sources.0.path={shakespeare_dir}", f"run.root={runs}", "tracking=none"]
    args += ["launcher.nproc=2", *(o.format(tmp=tmp_path) for o in overrides)]
    out = _cli(args, tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("llmtrain")]
    assert len(lines) == 1 and lines[0].startswith(needle.format(tmp=tmp_path)), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not runs.exists()


def test_a_rejected_resume_writes_nothing_into_the_run_folder(shakespeare_dir, tmp_path):
    """checkpoint.resume=none over a run with checkpoints is refused; the run's config.yaml stays the
    one of the run that wrote those checkpoints (it was overwritten before the refusal)."""
    args = [*TINY, f"data.sources.0.path={shakespeare_dir}", f"run.root={tmp_path}", "tracking=none"]
    assert _cli([*args, "trainer.max_steps=2"], tmp_path).returncode == 0
    config = tmp_path / "default" / "config.yaml"
    before = config.read_text()
    out = _cli([*args, "trainer.max_steps=3", "checkpoint.resume=none", "optim.lr=0.5"], tmp_path)
    assert out.returncode == 2 and "checkpoint.resume=none but" in out.stderr, out.stderr[-2000:]
    assert config.read_text() == before
