"""One compact console line per log interval (rank 0), e.g.

step   40/200 | loss 2.4311 | lr 9.71e-04 | gnorm 0.62 | 41.2k tok/s | mfu 3.1% of bf16 989.4 | mem 0.9G | eta 0:01:12

("of bf16 989.4": the per-device peak TFLOP/s MFU divides by, and its dtype: fp8 when parallel.fp8 is on.)
"""

import logging
import time

log = logging.getLogger("llmtrain")


def fmt_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def format_line(step: int, max_steps: int, m: dict[str, float], peak: str | None = None) -> str:
    """The console line for a metrics dict (keys as logged to MLflow); `peak` names MFU's denominator."""
    parts = [
        f"step {step:>{len(str(max_steps))}}/{max_steps}",
        f"loss {m['train/loss']:.4f}",
        f"lr {m['train/lr']:.2e}",
        f"gnorm {m['train/grad_norm']:.2f}",
        f"{fmt_count(m['perf/tokens_per_s'])} tok/s",
    ]
    if "train/ce" in m:  # distillation: the student's own cross-entropy and KL beside the mixed loss
        parts.append(f"ce {m['train/ce']:.4f} | kl {m['train/kl']:.4f}")
    if "perf/mfu" in m:
        parts.append(f"mfu {100 * m['perf/mfu']:.1f}%" + (f" of {peak}" if peak else ""))
    if "sys/mem_gb" in m:
        parts.append(f"mem {m['sys/mem_gb']:.1f}G")
    if "perf/eta_s" in m:
        parts.append(f"eta {fmt_duration(m['perf/eta_s'])}")
    return " | ".join(parts)


def format_metrics(m: dict[str, float], prefix: str) -> str:
    """`loss 2.4302 | ppl 11.36 | ...` for the metrics under `prefix` (e.g. the validation line)."""
    return " | ".join(
        f"{k[len(prefix) :]} {v:.2f}" if k.endswith("ppl") else f"{k[len(prefix) :]} {v:.4f}"
        for k, v in m.items()
        if k.startswith(prefix)
    )


class ConsoleLogger:
    """Rank-0 console output; keeps no state worth checkpointing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.time()

    def info(self, msg: str) -> None:
        if self.enabled:
            log.info(msg)

    def warning(self, msg: str) -> None:
        """Something the user should act on or know changed (rank 0 only, like every console line)."""
        if self.enabled:
            log.warning(msg)

    def step(self, step: int, max_steps: int, metrics: dict[str, float], peak: str | None = None) -> None:
        if self.enabled:
            log.info(format_line(step, max_steps, metrics, peak))
