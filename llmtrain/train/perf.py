"""Throughput meter: tokens/s, MFU, memory and ETA over a log interval."""

import functools
import time

import psutil
import torch

from llmtrain.train.flops import device_peak_tflops


@functools.cache
def measure_cpu_peak_tflops(seconds: float = 0.3) -> float:
    """Achievable fp32 matmul TFLOP/s of this process's threads (CPUs have no datasheet peak we can
    trust across SKUs and thread counts, so MFU on CPU is relative to a measured GEMM rate)."""
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e12


def peak_tflops(device: torch.device, override: float | None) -> float:
    """Per-device peak used as the MFU denominator."""
    if override:
        return override
    if device.type == "cuda":
        peak = device_peak_tflops(torch.cuda.get_device_name(device))
        if peak:
            return peak
    return measure_cpu_peak_tflops()


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (GPU) or resident set size (CPU) of this process, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return psutil.Process().memory_info().rss / 1e9


class Meter:
    """Accumulates step timings between log lines."""

    def __init__(self, flops_per_token: float, peak_tflops_per_device: float, world_size: int) -> None:
        self.flops_per_token, self.peak, self.world = flops_per_token, peak_tflops_per_device, world_size
        self.reset()

    def reset(self) -> None:
        self.tokens, self.seconds, self.data_seconds, self.steps = 0, 0.0, 0.0, 0

    def update(self, tokens: int, seconds: float, data_seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.data_seconds += data_seconds
        self.steps += 1

    def metrics(self, steps_left: int) -> dict[str, float]:
        tps = self.tokens / max(self.seconds, 1e-9)
        step_time = self.seconds / max(self.steps, 1)
        achieved = tps * self.flops_per_token / self.world / 1e12
        return {
            "perf/tokens_per_s": tps,
            "perf/step_time_s": step_time,
            "perf/data_wait_s": self.data_seconds / max(self.steps, 1),
            "perf/tflops_per_device": achieved,
            "perf/mfu": achieved / self.peak if self.peak else 0.0,
            "perf/eta_s": steps_left * step_time,
        }
