"""A robust loss-spike detector: z-score of a loss against the median and MAD of recent losses."""

import math
import statistics
from collections import deque

MAD_TO_SIGMA = 1.4826
"""MAD * 1.4826 estimates the standard deviation of normally distributed values."""


class SpikeDetector:
    """Flags a loss whose robust z-score over the last `window` accepted losses exceeds `threshold`.

    Median and MAD rather than mean and standard deviation: one earlier spike (or a NaN that was
    skipped) must not inflate the scale and hide the next one. Only upward moves count (a falling loss
    is training working). Nothing is flagged before `warmup` losses were accepted, because early
    losses fall too fast for any window to describe them. Deterministic: every rank, fed the same
    global losses, flags the same steps.
    """

    def __init__(self, window: int, threshold: float, warmup: int) -> None:
        self.threshold, self.warmup = threshold, warmup
        self.recent: deque[float] = deque(maxlen=window)
        self.accepted = 0

    def score(self, loss: float) -> float:
        """Robust z of `loss` against the window (0 while warming up or with too few values)."""
        if self.accepted < self.warmup or len(self.recent) < 3:
            return 0.0
        med = statistics.median(self.recent)
        mad = statistics.median(abs(x - med) for x in self.recent)
        scale = MAD_TO_SIGMA * mad + 1e-3 * abs(med) + 1e-12  # a flat window still has a scale
        return (loss - med) / scale

    def is_spike(self, loss: float) -> tuple[bool, float]:
        """(spike?, z) for a finite loss; does not change the window (see `accept`)."""
        z = self.score(loss)
        return z > self.threshold, z

    def accept(self, loss: float) -> None:
        """Add a loss the run trained on to the window."""
        if math.isfinite(loss):
            self.recent.append(loss)
            self.accepted += 1
