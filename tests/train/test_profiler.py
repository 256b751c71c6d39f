"""trainer.profile=true writes a torch profiler trace of the chosen step window (run folder and MLflow
artifacts); MFU/HFU are logged."""

import json
from pathlib import Path

import pytest

from llmtrain.distributed.env import DistEnv
from llmtrain.models import model_args
from llmtrain.tracking.tracker import Tracker
from llmtrain.train.flops import flops_per_token, recompute_fraction
from llmtrain.train.profiler import StepProfiler
from llmtrain.train.trainer import Trainer

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn_dim=64",
    "data.seq_len=32",
    "trainer.global_batch_size=2",
    "trainer.micro_batch_size=2",
    "trainer.num_threads=1",
    "trainer.log_every=1",
    "trainer.val_batches=1",
    "checkpoint.enabled=false",
]


def test_profile_window_trace_and_mfu_metrics(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[tuple[int, dict[str, float]]] = []
    monkeypatch.setattr(Tracker, "log_metrics", lambda self, m, step: logged.append((step, dict(m))))
    cfg = make_config(
        *TINY,
        "trainer.max_steps=4",
        "trainer.profile=true",
        "trainer.profile_start=2",
        "trainer.profile_steps=2",
        "trainer.peak_tflops=0.5",
        "parallel.activation_checkpoint=full",
        "tracking=mlflow",
        "run.name=prof",
    )
    out = Trainer(cfg, DistEnv(0, 0, 1, 1)).train()
    folder = Path(out["run_dir"]) / "profile"
    traces = sorted(p.name for p in folder.glob("trace_*.json"))
    assert traces == ["trace_rank0_steps2-3.json"]
    events = json.loads((folder / traces[0]).read_text())["traceEvents"]
    assert any("aten::mm" in str(e.get("name")) for e in events)  # real ops were recorded
    assert "aten::" in next(folder.glob("summary_*.txt")).read_text()
    # the trace folder also went to the run's MLflow artifacts (local sqlite store under run.root)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.run.root) / 'mlflow.db'}")
    uploaded = {a.path for a in client.list_artifacts(out["mlflow"]["run_id"], "profile")}
    assert "profile/trace_rank0_steps2-3.json" in uploaded

    perf = [m for _, m in logged if "perf/mfu" in m]
    assert len(perf) == 4
    args = model_args(cfg.model)
    mfu_flops = flops_per_token(args, 32)
    hfu_flops = flops_per_token(args, 32, recompute_fraction("full", args.n_layers))
    for m in perf:
        assert m["perf/mfu"] == pytest.approx(m["perf/tokens_per_s"] * mfu_flops / 1e12 / 0.5)
        assert m["perf/hfu"] == pytest.approx(m["perf/mfu"] * hfu_flops / mfu_flops)
        assert m["perf/hfu"] > m["perf/mfu"] > 0


def test_profiler_closes_window_on_early_stop(tmp_path: Path) -> None:
    import torch

    prof = StepProfiler(tmp_path / "profile", start=1, num_steps=5)
    prof.begin(0)
    torch.ones(8) @ torch.ones(8)
    prof.on_step_end(1)
    path = prof.close()  # the run stopped at step 1, inside the window
    assert path is not None and path.name == "trace_rank0_steps1-1.json" and path.is_file()
    assert prof.close() is None


def test_profiler_rejects_bad_window(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"trainer\.profile_start"):
        StepProfiler(tmp_path, start=0, num_steps=2)
