"""Per-step cost of MLflow tracking for the tiny CPU model (worst case: metrics every step).

    .venv/bin/python bench/tracking_overhead.py [--steps 150]   # table on stdout, JSON in bench/results/

Two runs of the same job in this process, one with `tracking=none` and one with `tracking=mlflow`
on the default local sqlite store, `trainer.log_every=1` and system metrics every second. Reported:
  - log call: time the training thread spends in `Tracker.log_metrics` per step (what tracking can
    add to the step directly: it only appends records to a list);
  - upload CPU: CPU time of the upload and system-metrics threads per step (runs beside training;
    it costs step time only when the cores are saturated);
  - step time with and without tracking (wall clock, single runs: noise on a shared machine is
    larger than the effect, so the first two rows are the figures to compare with the step).
Steps 1-10 are warm-up and not counted.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmtrain.data.prepare import prepare_dataset  # noqa: E402
from llmtrain.distributed.env import DistEnv  # noqa: E402
from llmtrain.testing import compose_config  # noqa: E402
from llmtrain.tracking.tracker import Tracker  # noqa: E402
from llmtrain.train.trainer import Trainer  # noqa: E402

WARMUP = 10
MODEL = ["model=tiny", "data.seq_len=128", "trainer.micro_batch_size=8", "trainer.global_batch_size=8"]


class TimedTrainer(Trainer):
    """Wall time of each whole step (record() to record(), so logging is included)."""

    def record(self, *args: float) -> None:
        super().record(*args)
        now = time.perf_counter()
        self.step_times = getattr(self, "step_times", [])
        if hasattr(self, "_last"):
            self.step_times.append(now - self._last)
        self._last = now


def thread_cpu_s(names: tuple[str, ...]) -> float:
    """CPU seconds used so far by this process's threads with these names."""
    import threading

    ids = {t.native_id for t in threading.enumerate() if t.name in names}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


def run(data: Path, root: Path, tracking: str, steps: int) -> dict[str, float]:
    cfg = compose_config([
        f"data.sources.0.path={data}", f"run.root={root}", f"run.name={tracking}", *MODEL,
        f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.val_every=0", "trainer.val_batches=1",
        "trainer.num_threads=1", "checkpoint.enabled=false", f"tracking={tracking}",
        "tracking.system_metrics_every_s=1",
    ])  # fmt: skip
    spent = {"log_s": 0.0, "calls": 0, "upload_cpu_s": 0.0}
    original = Tracker.log_metrics

    def timed_log(self: Tracker, metrics: dict[str, float], step: int) -> None:
        t0 = time.perf_counter()
        original(self, metrics, step)
        spent["log_s"] += time.perf_counter() - t0
        spent["calls"] += 1
        if step == steps:  # threads still alive: read their CPU time before finish() joins them
            spent["upload_cpu_s"] = thread_cpu_s(("mlflow-upload", "system-metrics"))

    Tracker.log_metrics = timed_log
    try:
        trainer = TimedTrainer(cfg, DistEnv(0, 0, 1, 1))
        trainer.train()
    finally:
        Tracker.log_metrics = original
    times = trainer.step_times[WARMUP - 1 :]
    return {
        "step_s_mean": statistics.mean(times),
        "step_s_median": statistics.median(times),
        "log_call_s_per_step": spent["log_s"] / steps,
        "upload_cpu_s_per_step": spent["upload_cpu_s"] / steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "tracking_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_dataset("builtin:shakespeare", data, "byte", shard_tokens=1 << 20, val_fraction=0.05)
        off = run(data, Path(tmp) / "runs", "none", args.steps)
        on = run(data, Path(tmp) / "runs", "mlflow", args.steps)
    step = off["step_s_median"]
    result = {
        "model": MODEL,
        "steps": args.steps,
        "log_every": 1,
        "without_tracking": off,
        "with_tracking": on,
        "log_call_pct_of_step": 100 * on["log_call_s_per_step"] / step,
        "upload_cpu_pct_of_step": 100 * on["upload_cpu_s_per_step"] / step,
        "step_time_diff_pct": 100 * (on["step_s_median"] - step) / step,
        "cpu": f"{psutil.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    rows = [
        ("step time, tracking=none (median)", f"{1e3 * step:.2f} ms"),
        ("step time, tracking=mlflow (median)", f"{1e3 * on['step_s_median']:.2f} ms"),
        ("log_metrics call per step", f"{1e6 * on['log_call_s_per_step']:.1f} us"),
        ("  = % of a step", f"{result['log_call_pct_of_step']:.3f} %"),
        ("upload + sampler thread CPU per step", f"{1e3 * on['upload_cpu_s_per_step']:.2f} ms"),
        ("  = % of a step", f"{result['upload_cpu_pct_of_step']:.2f} %"),
        ("step time difference (noisy)", f"{result['step_time_diff_pct']:+.2f} %"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"tracking overhead, tiny model, {args.steps} steps, metrics every step")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>12}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
