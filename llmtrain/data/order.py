"""Sample order without materialising anything the size of the dataset.

- `Permutation`: a seeded bijection of [0, n) (a 4-round Feistel network on the next even power of
  two, cycle-walking back into range). O(1) memory and random access, so a shuffled epoch over
  billions of samples costs nothing to set up, and each epoch gets its own key (reshuffle).
- `MixSchedule`: which source each global sample comes from. Sample g goes to the source with the
  largest deficit  w_i * (g + 1) - c_i  (c_i = samples already taken from source i; ties -> lowest i).
  This is deterministic, needs only the counts c_i as state, and keeps |c_i - w_i * g| < 1 for every
  prefix, so realised shares track the weights at every step, not just on average.
"""

import hashlib
from collections.abc import Callable

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a cheap, well-mixed 64-bit hash (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1  # array arithmetic wraps modulo 2**64 without warnings
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int | str) -> int:
    """A 64-bit key from (seed, epoch, source, ...), stable across Python versions and machines."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class Permutation:
    """A pseudo-random bijection of [0, n) determined by `key`."""

    ROUNDS = 4

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = n
        self.half = (max((n - 1).bit_length(), 2) + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(derive_key(key, r)) for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_splitmix(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        """Images of the indices `idx` (each in [0, n))."""
        y = self._encrypt(np.asarray(idx, dtype=np.uint64))
        out = y >= np.uint64(self.n)
        while out.any():  # cycle-walk: expected < 4 extra rounds since the domain is < 4n
            y[out] = self._encrypt(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)


class MixSchedule:
    """Deterministic interleaving of sources in proportion to their weights (see module doc).

    Shares are counted in units: one per sample by default, or `cost(source, ordinal)` units per
    sample (the loader passes the sample's loss-carrying tokens when sequences are padded, so that
    weights are shares of trained tokens there too). Then the deficit is w_i * (U + 1) - u_i with U
    the units taken so far, and |u_i - w_i * U| stays below one sample's units.
    """

    def __init__(self, weights: list[float]) -> None:
        total = float(sum(weights))
        if not weights or min(weights) <= 0:
            raise ValueError(f"data.sources weights must all be > 0, got {weights}")
        self.weights = [w / total for w in weights]

    def assign(
        self,
        counts: list[int],
        n: int,
        units: list[int] | None = None,
        cost: Callable[[int, int], int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
        """The next n global samples after `counts` samples (and `units`) taken per source: their
        source, their ordinal within that source, and the counts and units afterwards."""
        counts = list(counts)
        units = list(counts if units is None else units)
        if len(self.weights) == 1:
            ordinals = counts[0] + np.arange(n, dtype=np.int64)
            extra = n if cost is None else sum(cost(0, int(o)) for o in ordinals)
            return np.zeros(n, dtype=np.int64), ordinals, [counts[0] + n], [units[0] + extra]
        src, ords = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        w, total = self.weights, sum(units)
        for t in range(n):
            nxt = total + 1
            best = max(range(len(w)), key=lambda i: (w[i] * nxt - units[i], -i))
            src[t], ords[t] = best, counts[best]
            step = 1 if cost is None else cost(best, counts[best])
            counts[best] += 1
            units[best] += step
            total += step
        return src, ords, counts, units
