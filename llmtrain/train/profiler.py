"""Step-window torch profiler (`trainer.profile=true`): an observer of the loop, never part of the math.

Steps are counted as the trainer does (step 1 is the first optimizer step). Steps
[profile_start, profile_start + profile_steps) are recorded; the Chrome trace (open it in Perfetto
or chrome://tracing) and an operator summary table go to `<run_dir>/profile/`, one file per rank,
and are handed to the tracker as artifacts when it can take them.
"""

import logging
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger("llmtrain")


class StepProfiler:
    """Starts a torch profiler before step `start` and exports it after step `start + num - 1`."""

    def __init__(
        self,
        folder: Path,
        *,
        start: int,
        num_steps: int,
        rank: int = 0,
        device_type: str = "cpu",
        enabled: bool = True,
        tracker: Any = None,
    ) -> None:
        if enabled and (start < 1 or num_steps < 1):
            raise ValueError(
                f"trainer.profile_start={start} and trainer.profile_steps={num_steps} must both be >= 1"
            )
        self.folder, self.start, self.last = folder, start, start + num_steps - 1
        self.rank, self.enabled, self.tracker = rank, enabled, tracker
        self.activities = [ProfilerActivity.CPU]
        if device_type == "cuda":
            self.activities.append(ProfilerActivity.CUDA)
        self.prof: profile | None = None
        self.first_step = self.last_done = 0
        self.trace_path: Path | None = None

    def begin(self, current_step: int) -> None:
        """Call once before the loop with the step training resumes from."""
        self._maybe_start(current_step + 1)

    def on_step_end(self, step: int) -> Path | None:
        """Call after each optimizer step; returns the trace path when the window just closed."""
        if self.prof is not None:
            self.last_done = step
            self.prof.step()
            if step >= self.last:
                return self.close(step)
        self._maybe_start(step + 1)
        return None

    def _maybe_start(self, next_step: int) -> None:
        if not self.enabled or self.prof is not None or self.trace_path is not None:
            return
        if self.start <= next_step <= self.last:  # also covers a resume inside the window
            self.prof = profile(activities=self.activities, record_shapes=True, profile_memory=True)
            self.prof.__enter__()
            self.first_step = next_step

    def close(self, step: int | None = None) -> Path | None:
        """Stop and export (also for a run that stops inside the window); idempotent."""
        if self.prof is None:
            return None
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        last = step if step is not None else max(self.last_done, self.first_step)
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}_steps{self.first_step}-{last}"
        self.trace_path = self.folder / f"trace_{stem}.json"
        prof.export_chrome_trace(str(self.trace_path))
        sort = "self_cuda_time_total" if ProfilerActivity.CUDA in self.activities else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        (self.folder / f"summary_{stem}.txt").write_text(table)
        log_artifacts = getattr(self.tracker, "log_artifacts", None)
        if callable(log_artifacts):
            log_artifacts(self.folder, "profile")
        log.info("profiler trace of steps %d-%d written to %s", self.first_step, last, self.trace_path)
        return self.trace_path


def build_profiler(
    trainer_cfg: Any, run_dir: Path, rank: int, device: torch.device, tracker: Any = None
) -> StepProfiler:
    """From the trainer config (profile, profile_start, profile_steps)."""
    return StepProfiler(
        run_dir / "profile",
        start=trainer_cfg.profile_start,
        num_steps=trainer_cfg.profile_steps,
        rank=rank,
        device_type=device.type,
        enabled=trainer_cfg.profile,
        tracker=tracker,
    )
