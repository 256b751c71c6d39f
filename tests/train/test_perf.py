"""MFU is never above 100%: the CPU peak is a best-of-N GEMM rate cached per machine (and raised
when a run computes faster), and any other peak that a run exceeds is clamped with a warning."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtrain.distributed.env import DistEnv
from llmtrain.train.perf import (
    MeasuredPeak,
    Meter,
    gemm_rates,
    measure_cpu_peak_tflops,
    peak_tflops,
)
from llmtrain.train.trainer import Trainer
from tests.train.test_trainer import SMALL

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cpu_peak_tflops.json"


def test_a_peak_below_the_achieved_rate_never_gives_mfu_above_one(caplog: pytest.LogCaptureFixture) -> None:
    meter = Meter(flops_per_token=6e9, peak_tflops_per_device=1e-3, world_size=2, hw_flops_per_token=8e9)
    meter.update(tokens=40_000, seconds=1.0, data_seconds=0.0)  # 120 TFLOP/s per device >> 0.001
    with caplog.at_level("WARNING", logger="llmtrain"):
        m = meter.metrics(steps_left=0)
        meter.metrics(steps_left=0)
    assert m["perf/mfu"] == 1.0 and m["perf/hfu"] == 1.0
    assert m["perf/tflops_per_device"] == pytest.approx(120.0)  # the rate itself is not clamped
    assert caplog.text.count("set trainer.peak_tflops") == 1  # warned once, naming the key


def test_the_cpu_peak_is_best_of_n_cached_and_reused_across_processes(cache: Path) -> None:
    torch.set_num_threads(1)
    rates = gemm_rates(0.06, torch.float32, repeats=3)
    assert len(rates) == 3 and all(r > 0 for r in rates)
    best = measure_cpu_peak_tflops(0.06, repeats=3)
    assert best > 0
    first = peak_tflops(torch.device("cpu"), None)
    assert isinstance(first, MeasuredPeak) and cache.is_file()
    assert json.loads(cache.read_text()) == {first.key: float(first)}
    cmd = "import torch; torch.set_num_threads(1); from llmtrain.train.perf import peak_tflops; "
    cmd += "print(repr(float(peak_tflops(torch.device('cpu'), None))))"
    env = {"PYTHONPATH": str(ROOT), "LLMTRAIN_CACHE_DIR": str(cache.parent), "PATH": "/usr/bin:/bin"}
    again = [subprocess.run([sys.executable, "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
             for _ in range(2)]  # fmt: skip
    assert [float(r.stdout) for r in again] == [float(first)] * 2, [r.stderr for r in again]


def test_a_run_faster_than_the_measured_peak_raises_the_cached_peak(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.set_num_threads(1)
    key = peak_tflops(torch.device("cpu"), None).key
    cache.write_text(json.dumps({key: 1e-6}))  # as if measured while the cores were busy
    low = peak_tflops(torch.device("cpu"), None)
    assert low == 1e-6
    meter = Meter(6e6, low, 1)
    meter.update(tokens=1000, seconds=1.0, data_seconds=0.0)  # 0.006 TFLOP/s
    with caplog.at_level("WARNING", logger="llmtrain"):
        m = meter.metrics(0)
    assert m["perf/mfu"] == pytest.approx(1.0) and meter.peak == pytest.approx(0.006)
    assert json.loads(cache.read_text())[key] == pytest.approx(0.006)  # the next run starts from it
    assert "CPU peak raised from 1e-06 to 0.006 TFLOP/s" in caplog.text
    meter.reset()
    meter.update(tokens=500, seconds=1.0, data_seconds=0.0)
    assert meter.metrics(0)["perf/mfu"] == pytest.approx(0.5)


def test_reported_mfu_over_a_training_run_never_exceeds_one(
    make_config, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(*SMALL, "trainer.max_steps=6", "trainer.log_every=2", "trainer.peak_tflops=1e-6")
    with caplog.at_level("INFO", logger="llmtrain"):
        Trainer(cfg, DistEnv(0, 0, 1, 1)).train()
    mfu = [float(x) / 100 for x in re.findall(r"\| mfu ([0-9.]+)%", caplog.text)]
    assert len(mfu) == 3 and max(mfu) <= 1.0, mfu
