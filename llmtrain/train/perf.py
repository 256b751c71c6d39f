"""Throughput meter: tokens/s, achieved TFLOP/s, MFU/HFU, memory and ETA over a log interval.

MFU = model FLOPs per second per device / peak; HFU counts the recomputed forward of activation
checkpointing too (see `llmtrain.train.flops`). Both share one peak, so HFU >= MFU always.
"""

import functools
import logging
import time
from typing import Any

import psutil
import torch

from llmtrain.train.flops import lookup_peak_tflops

log = logging.getLogger("llmtrain")


@functools.cache
def measure_cpu_peak_tflops(seconds: float = 0.3, dtype: torch.dtype = torch.float32) -> float:
    """Achievable matmul TFLOP/s of this process's threads in `dtype`. CPUs have no datasheet peak
    we can trust across SKUs, thread counts and shared hosts, so MFU on CPU is relative to a
    measured 512^3 GEMM rate (the best case for these cores), not to a vendor number."""
    n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e12


def peak_tflops(
    device: torch.device, override: float | None, dtype: torch.dtype = torch.float32
) -> float | None:
    """Per-device peak used as the MFU denominator: trainer.peak_tflops, else the datasheet table for
    GPUs, else a measured GEMM rate on CPU. An unknown GPU gives None (MFU is then not reported
    rather than divided by a wrong peak) and a warning naming the key to set."""
    if override:
        return float(override)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = lookup_peak_tflops(name, "bf16" if dtype == torch.bfloat16 else "fp32")  # TF32 stays off
        if found is None:
            log.warning("no peak TFLOP/s known for %r: set trainer.peak_tflops to report MFU", name)
            return None
        return found[1]
    return measure_cpu_peak_tflops(dtype=dtype)


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
    ) -> None:
        self.flops_per_token = flops_per_token
        self.hw_flops_per_token = hw_flops_per_token or flops_per_token
        self.peak, self.world = peak_tflops_per_device, world_size
        self.reset()

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
            out["perf/mfu"] = achieved / self.peak
            out["perf/hfu"] = achieved * self.hw_flops_per_token / self.flops_per_token / self.peak
        return out
