"""The robust spike detector on crafted loss series."""

import math
import random

from llmtrain.resilience import SpikeDetector


def _feed(det: SpikeDetector, series: list[float]) -> list[int]:
    flagged = []
    for i, x in enumerate(series):
        spike, _ = det.is_spike(x)
        if spike:
            flagged.append(i)
        else:
            det.accept(x)
    return flagged


def test_flags_exactly_the_spike_in_a_noisy_falling_series():
    rng = random.Random(0)
    series = [3.0 * math.exp(-i / 400) + rng.gauss(0, 0.02) for i in range(200)]
    series[120] += 1.0  # ~50 sigma of the noise
    assert _feed(SpikeDetector(window=50, threshold=6.0, warmup=20), series) == [120]


def test_warmup_hides_early_jumps_and_a_spike_does_not_raise_the_scale():
    series = [2.0, 2.0, 9.0] + [2.0 + 0.01 * (i % 3) for i in range(30)] + [5.0, 2.0, 5.0]
    det = SpikeDetector(window=20, threshold=6.0, warmup=10)
    # index 2 is inside the warm-up; both late spikes are flagged (the first one stayed out of the window)
    assert _feed(det, series) == [33, 35]
    assert max(det.recent) < 2.1


def test_score_is_robust_z():
    det = SpikeDetector(window=10, threshold=3.0, warmup=0)
    for x in [1.0, 2.0, 3.0, 4.0, 5.0]:
        det.accept(x)
    # median 3, MAD 1 -> scale 1.4826 + 1e-3 * 3
    assert det.score(6.0) == (6.0 - 3.0) / (1.4826 + 3e-3 + 1e-12)
    assert det.is_spike(2.0) == (False, det.score(2.0))
