"""Non-finite losses/gradients and loss spikes: detect on every rank alike, skip, roll back or stop
(docs/resilience.md). The trainer owns one `Resilience` and calls it around each step."""

from llmtrain.resilience.guard import Resilience, ResilienceStop
from llmtrain.resilience.spikes import SpikeDetector
from llmtrain.resilience.watchdog import HANG_EXIT_CODE, HangWatchdog, report_hang

__all__ = ["HANG_EXIT_CODE", "HangWatchdog", "Resilience", "ResilienceStop", "SpikeDetector", "report_hang"]
