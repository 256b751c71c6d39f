"""The seeded bijection and the mixing schedule: exact properties on small and odd sizes."""

import numpy as np
import pytest

from llmtrain.data.order import MixSchedule, Permutation, derive_key


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n: int) -> None:
    p = Permutation(n, derive_key(5, 0, 0))
    out = p(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    np.testing.assert_array_equal(p(np.arange(n)), out)  # deterministic
    np.testing.assert_array_equal(p(np.arange(n)[::-1])[::-1], out)  # random access, any order


def test_permutation_depends_on_key_and_is_well_mixed() -> None:
    n = 10_000
    a, b = (
        Permutation(n, derive_key(1, 0, 0))(np.arange(n)),
        Permutation(n, derive_key(1, 0, 1))(np.arange(n)),
    )
    assert (a != b).mean() > 0.99
    # a shuffle, not a rotation: consecutive inputs land far apart and the order is uncorrelated
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05
    assert np.median(np.abs(np.diff(a))) > n / 10


def test_mix_schedule_tracks_weights_at_every_prefix() -> None:
    weights = [0.5, 0.3, 0.2]
    sched = MixSchedule(weights)
    src, ords, counts, _ = sched.assign([0, 0, 0], 10_000)
    assert counts == [5000, 3000, 2000]
    for i, w in enumerate(weights):
        taken = np.cumsum(src == i)
        expected = w * np.arange(1, len(src) + 1)
        assert np.abs(taken - expected).max() < 1.0  # low discrepancy, not just on average
        np.testing.assert_array_equal(ords[src == i], np.arange(counts[i]))  # ordinals count up
    # resuming from the counts continues the same sequence
    s1, o1, c1, _ = sched.assign([0, 0, 0], 700)
    s2, o2, _, _ = sched.assign(c1, 300)
    np.testing.assert_array_equal(np.concatenate([s1, s2]), src[:1000])
    np.testing.assert_array_equal(np.concatenate([o1, o2]), ords[:1000])


def test_mix_schedule_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="weights"):
        MixSchedule([0.5, 0.0])


def test_mix_schedule_in_units_balances_units_not_samples() -> None:
    # source 0 samples are worth 10 units, source 1 samples 1 unit: equal weights -> equal units
    sched = MixSchedule([1.0, 1.0])
    _, _, counts, units = sched.assign([0, 0], 1100, cost=lambda s, o: 10 if s == 0 else 1)
    assert units[0] + units[1] == 10 * counts[0] + counts[1]
    assert abs(units[0] - units[1]) <= 10
    assert counts[1] > 9 * counts[0]
