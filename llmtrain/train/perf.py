"""Throughput meter: tokens/s, achieved TFLOP/s, MFU/HFU, memory and ETA over a log interval.

MFU = model FLOPs per second per device / peak; HFU counts the recomputed forward of activation
checkpointing too (see `llmtrain.train.flops`). Both share one peak, so HFU >= MFU always, and
neither is ever reported above 1: on CPU the peak is the best of repeated GEMM bursts, cached per
machine (`user_cache_dir()/cpu_peak_tflops.json`) and raised when a run computes faster; a configured
or datasheet peak that a run exceeds is wrong, so MFU/HFU are clamped and a warning names the key.
"""

import json
import logging
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from llmtrain.paths import user_cache_dir
from llmtrain.train.flops import lookup_peak_tflops

log = logging.getLogger("llmtrain")


def gemm_rates(seconds: float, dtype: torch.dtype, repeats: int) -> list[float]:
    """TFLOP/s of `repeats` back-to-back bursts of 512^3 GEMMs, `seconds / repeats` each, with this
    process's threads."""
    n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    rates = []
    for _ in range(repeats):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / repeats:
            a @ b
            count += 1
        rates.append(2 * n**3 * count / (time.perf_counter() - t0) / 1e12)
    return rates


def measure_cpu_peak_tflops(
    seconds: float = 0.3, dtype: torch.dtype = torch.float32, repeats: int = 6
) -> float:
    """Achievable matmul TFLOP/s of this process's threads in `dtype`: the best of several short
    GEMM bursts, so that a burst slowed by another process (a rank starting beside it, a neighbour on
    a shared host) does not set the peak. CPUs have no datasheet peak we can trust across SKUs,
    thread counts and shared hosts, so MFU on CPU is relative to this measured rate."""
    return max(gemm_rates(seconds, dtype, repeats))


class MeasuredPeak(float):
    """A CPU peak measured on this machine, with its key in the per-machine cache: the Meter raises
    it (and the cache) when the run itself computes faster than the measurement."""

    key: str

    def __new__(cls, value: float, key: str) -> "MeasuredPeak":
        obj = super().__new__(cls, value)
        obj.key = key
        return obj


def cpu_peak_cache() -> Path:
    return user_cache_dir() / "cpu_peak_tflops.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_key(dtype: torch.dtype) -> str:
    """One machine, CPU model, thread count, dtype and torch version share one cached peak."""
    return f"{socket.gethostname()}|{_cpu_model()}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}"


def _read_peaks() -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(cpu_peak_cache().read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def record_cpu_peak(key: str, tflops: float) -> float:
    """Keep the best peak seen for `key` in the cache (atomic replace; a cache that cannot be
    written only costs a re-measurement next time). Returns the value now recorded."""
    peaks = _read_peaks()
    best = max(tflops, peaks.get(key, 0.0))
    path = cpu_peak_cache()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**peaks, key: best}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache the CPU peak in %s (%s)", path, e)
    return best


def cpu_peak_tflops(dtype: torch.dtype = torch.float32) -> MeasuredPeak:
    """This machine's CPU peak: the cached value, else a best-of-N measurement that is then cached,
    so every run on the machine divides by the same number."""
    key = _cpu_key(dtype)
    if (cached := _read_peaks().get(key)) is not None:
        return MeasuredPeak(cached, key)
    return MeasuredPeak(record_cpu_peak(key, measure_cpu_peak_tflops(dtype=dtype)), key)


def peak_tflops(
    device: torch.device, override: float | None, dtype: torch.dtype = torch.float32
) -> float | None:
    """Per-device peak used as the MFU denominator: trainer.peak_tflops, else the datasheet table for
    GPUs (the FP8 one for an FP8 `dtype`), else this machine's cached, measured GEMM rate on CPU
    (FP8 is emulated there: its matmuls run in fp32). An unknown GPU gives None (MFU is then not
    reported rather than divided by a wrong peak) and a warning naming the key to set."""
    if override:
        return float(override)
    fp8 = dtype in FP8_DTYPES
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = lookup_peak_tflops(name, "fp8" if fp8 else "bf16" if dtype == torch.bfloat16 else "fp32")
        if found is None:
            log.warning("no peak TFLOP/s known for %r: set trainer.peak_tflops to report MFU", name)
            return None
        return found[1]
    return cpu_peak_tflops(torch.float32 if fp8 else dtype)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
PEAK_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8"}


def peak_label(dtype: torch.dtype, peak: float | None) -> str | None:
    """What MFU divides by, for the console line: 'fp8 1979' (TFLOP/s per device)."""
    if not peak:
        return None
    name = PEAK_NAMES.get(dtype, str(dtype))
    if dtype in FP8_DTYPES and isinstance(peak, MeasuredPeak):
        name = "cpu fp32 (fp8 emulated)"
    return f"{name} {peak:.4g}"


def processed_tokens(batches: list[Any], dp_size: int, fallback: int) -> int:
    """Tokens the model ran on this step over all data-parallel ranks: the FLOPs happen on every
    input position, also those whose target is ignored (padding, masked prompts), so throughput and
    MFU count inputs, not loss tokens. `fallback` (the loss-token count) for batch types without
    an `inputs` tensor."""
    sizes = [getattr(b, "inputs", None) for b in batches]
    if not sizes or not all(isinstance(t, torch.Tensor) for t in sizes):
        return fallback
    return sum(t.numel() for t in sizes) * dp_size


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (GPU) or resident set size (CPU) of this process, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return psutil.Process().memory_info().rss / 1e9


class Meter:
    """Accumulates step timings between log lines and turns them into throughput metrics."""

    def __init__(
        self,
        flops_per_token: float,
        peak_tflops_per_device: float | None,
        world_size: int,
        hw_flops_per_token: float | None = None,
        peak_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.flops_per_token = flops_per_token
        self.peak_dtype = peak_dtype
        self.hw_flops_per_token = hw_flops_per_token or flops_per_token
        self.peak, self.world = peak_tflops_per_device, world_size
        self.warned = False
        self.reset()

    @property
    def peak_label(self) -> str | None:
        """The peak MFU divides by, e.g. 'fp8 1979' (the console line says 'mfu 41% of fp8 1979')."""
        return peak_label(self.peak_dtype, self.peak)

    def reset(self) -> None:
        self.tokens, self.seconds, self.data_seconds, self.steps = 0, 0.0, 0.0, 0

    def update(self, tokens: int, seconds: float, data_seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.data_seconds += data_seconds
        self.steps += 1

    def metrics(self, steps_left: int) -> dict[str, float]:
        """Interval metrics; tokens are global (all ranks), TFLOP/s and MFU are per device."""
        tps = self.tokens / max(self.seconds, 1e-9)
        step_time = self.seconds / max(self.steps, 1)
        achieved = tps * self.flops_per_token / self.world / 1e12
        out = {
            "perf/tokens_per_s": tps,
            "perf/step_time_s": step_time,
            "perf/data_wait_s": self.data_seconds / max(self.steps, 1),
            "perf/tflops_per_device": achieved,
            "perf/eta_s": steps_left * step_time,
        }
        if self.peak:
            hardware = achieved * self.hw_flops_per_token / self.flops_per_token
            if hardware > self.peak:
                self._peak_exceeded(hardware)
            out["perf/mfu"] = min(achieved / self.peak, 1.0)
            out["perf/hfu"] = min(hardware / self.peak, 1.0)
        return out

    def _peak_exceeded(self, hardware: float) -> None:
        """The run computed faster than the peak. A measured CPU peak was taken under load: raise it
        to what the run reached (and cache that). Any other peak is wrong: MFU is clamped to 100%
        and one warning names the key to fix."""
        if isinstance(self.peak, MeasuredPeak):
            old, self.peak = self.peak, MeasuredPeak(record_cpu_peak(self.peak.key, hardware), self.peak.key)
            log.warning(
                "CPU peak raised from %.3g to %.3g TFLOP/s: this run computed faster than the GEMM "
                "measurement (taken under load); cached in %s. Set trainer.peak_tflops to fix the denominator.",
                old,
                self.peak,
                cpu_peak_cache(),
            )
        elif not self.warned:
            self.warned = True
            log.warning(
                "achieved %.3g TFLOP/s per device exceeds the peak of %.3g: MFU/HFU are clamped to 100%%; "
                "set trainer.peak_tflops to this device's real peak",
                hardware,
                self.peak,
            )
