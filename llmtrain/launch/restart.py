"""In-job restart (resilience.max_restarts) and the crash-loop stop, for the local/torchrun launcher.

After a rank crash or a hang-watchdog exit the launcher starts all ranks again; they resume from the
newest complete checkpoint of the same run folder (the ordinary resume path), continue the same MLflow
run (its id is in the checkpoint and in the run folder) and so reproduce the uninterrupted loss trace.
The step that failed is the one after the last step in train_log.jsonl; when the same step fails
`crash_loop_after` times in a row the job stops with the reason and CRASH_LOOP_EXIT_CODE instead of
spending the rest of the budget on a fault that comes back (a bad node, a batch that crashes).
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from llmtrain.checkpoint import latest_checkpoint
from llmtrain.config.resilience import ResilienceConfig
from llmtrain.resilience.events import append_event

CRASH_LOOP_EXIT_CODE = 76
"""The job ended because the same step failed resilience.crash_loop_after times in a row."""


def failed_step(run_dir: Path) -> int:
    """The step that was being trained when the job failed: one past the last logged one."""
    log_file = run_dir / "train_log.jsonl"
    lines = log_file.read_text().splitlines() if log_file.is_file() else []
    return (json.loads(lines[-1])["step"] if lines else 0) + 1


@dataclass
class Decision:
    """What to do after a failed attempt: restart, or stop with `code` and `message`."""

    restart: bool
    code: int
    message: str


class RestartBudget:
    """Counts restarts and consecutive failures of one step over the attempts of one job."""

    def __init__(self, cfg: ResilienceConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.attempt, self.last_step, self.same_step = 0, -1, 0

    def after_failure(self, code: int) -> Decision:
        """Decide after attempt `self.attempt` ended with `code` (1: a rank failed, 75: a hang) and
        record the decision in events.jsonl. With max_restarts=0 the job ends as it always did."""
        if self.cfg.max_restarts == 0:
            return Decision(False, code, "")
        step = failed_step(self.run_dir)
        self.same_step = self.same_step + 1 if step == self.last_step else 1
        self.last_step = step
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        decision = self._decide(step, code, ckpt)
        kind = (
            "restart"
            if decision.restart
            else "crash_loop"
            if decision.code == CRASH_LOOP_EXIT_CODE
            else "failure"
        )
        details = {"attempt": self.attempt, "exit_code": code, "failed_step": step, "checkpoint": str(ckpt)}
        entry = {
            "time": time.time(),
            "step": step - 1,
            "kind": kind,
            "action": "restart" if decision.restart else "stop",
        }
        append_event(self.run_dir, entry | {"details": details | {"reason": decision.message}})
        return decision

    def _decide(self, step: int, code: int, ckpt: Path | None) -> Decision:
        c = self.cfg
        if self.same_step >= c.crash_loop_after:
            return Decision(
                False,
                CRASH_LOOP_EXIT_CODE,
                f"crash loop: step {step} failed {self.same_step} times in a row "
                f"(resilience.crash_loop_after={c.crash_loop_after}); not restarting",
            )
        if self.attempt >= c.max_restarts:
            return Decision(False, code, f"no restart left (resilience.max_restarts={c.max_restarts})")
        self.attempt += 1
        start = f"from {ckpt}" if ckpt is not None else "from scratch (no checkpoint yet)"
        return Decision(
            True, code, f"restarting all ranks {start} (restart {self.attempt} of {c.max_restarts})"
        )
