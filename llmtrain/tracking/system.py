"""System metrics (CPU/RAM of the node and of rank 0, GPU memory/utilisation) from a background thread.

Samples are logged at the current training step (the last step handed to the tracker), at most one
sample per step, so every metric series keeps strictly increasing steps. With steps slower than
`tracking.system_metrics_every_s` the sampling rate drops to one per step.
GPU figures cover the GPUs visible to rank 0 (its node): memory from torch.cuda, utilisation and
board memory from NVML (`pynvml`) when it is installed.
"""

import logging
import threading
from collections.abc import Callable
from typing import Any

import psutil

log = logging.getLogger("llmtrain")


def _nvml() -> Any | None:
    try:
        import pynvml  # provided by nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


class SystemSampler:
    """Calls `sink(metrics, step)` every `every_s` seconds while `current_step()` advances."""

    def __init__(
        self, sink: Callable[[dict[str, float], int], None], every_s: float, current_step: Callable[[], int]
    ) -> None:
        self.sink, self.every_s, self.current_step = sink, every_s, current_step
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)  # first call primes the counters and returns 0
        psutil.cpu_percent(None)
        self.nvml = _nvml()
        self.last_step = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    def start(self) -> "SystemSampler":
        self._thread.start()
        return self

    def sample(self) -> dict[str, float]:
        vm = psutil.virtual_memory()
        m = {
            "system/cpu_percent": psutil.cpu_percent(None),
            "system/process_cpu_percent": self.proc.cpu_percent(None),
            "system/ram_used_gb": (vm.total - vm.available) / 1e9,
            "system/ram_percent": vm.percent,
            "system/process_rss_gb": self.proc.memory_info().rss / 1e9,
        }
        m.update(self._gpu())
        return m

    def _gpu(self) -> dict[str, float]:
        import torch

        out: dict[str, float] = {}
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return out
        for i in range(torch.cuda.device_count()):
            out[f"system/gpu{i}_allocated_gb"] = torch.cuda.memory_allocated(i) / 1e9
            out[f"system/gpu{i}_reserved_gb"] = torch.cuda.memory_reserved(i) / 1e9
            if self.nvml is not None:
                try:
                    h = self.nvml.nvmlDeviceGetHandleByIndex(i)
                    out[f"system/gpu{i}_util_percent"] = float(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                    mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
                    out[f"system/gpu{i}_board_mem_percent"] = 100.0 * mem.used / max(mem.total, 1)
                except Exception as e:  # a lost GPU must not stop the sampler
                    log.debug("nvml query failed: %s", e)
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            step = self.current_step()
            if step <= self.last_step:
                continue
            try:
                self.sink(self.sample(), step)
                self.last_step = step
            except Exception as e:
                log.debug("system metrics sample failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
