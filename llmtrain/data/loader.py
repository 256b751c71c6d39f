"""Deterministic, resumable batches for one data-parallel rank.

Global sample order: sample g of the run comes from source s(g) (MixSchedule) and is that source's
c-th sample, c = how many samples the source gave before; its epoch is c // N_s and its position in
the epoch is Permutation(N_s, key(seed, source, epoch))(c % N_s). Optimizer step k consumes global
samples [k*G, (k+1)*G) and data-parallel rank r of D takes micro-batch m from positions
k*G + (m*D + r)*mb ... + mb. Ranks of one model replica (tp/pp) pass the same dp_rank and so get the
same batch.

The state is the cursor after the last step the trainer took: the global sample count and the count
per source. It is independent of D (resume under another dp size keeps the order) and of G (the
order is per sample, so even the global batch may change). A background thread (`prefetch`) builds
steps ahead, but the state only moves when `next_step` hands a step over.
"""

import functools
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmtrain.data.dataset import Samples, TokenDataset
from llmtrain.data.errors import DataError
from llmtrain.data.order import MixSchedule, Permutation, derive_key

IGNORE_INDEX = -100
ID_BLOCK = 4096
"""Ordinals whose shuffled sample ids are computed (and cached) together."""


@dataclass
class Batch:
    """One micro-batch: inputs (b, s), targets (b, s) with IGNORE_INDEX where no loss is taken, and
    for document masking RoPE positions (b, s) and a boolean attention mask (b, 1, s, s)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Target tokens that carry loss."""
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(move(self.inputs), move(self.targets), move(self.positions), move(self.attn_mask))


def collate(s: Samples, document_mask: bool) -> Batch:
    """Samples -> Batch. Targets past a sample's valid tokens (padding) are IGNORE_INDEX; with
    document_mask, positions restart at each document and attention stays inside it."""
    toks = torch.from_numpy(s.tokens)
    inputs, targets = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
    seq = inputs.shape[1]
    if s.padded:
        targets[torch.arange(seq).unsqueeze(0) >= torch.from_numpy(s.valid - 1).unsqueeze(1)] = IGNORE_INDEX
    if not document_mask:
        return Batch(inputs, targets)
    assert s.doc_ids is not None, "document_mask needs Samples.doc_ids"
    doc = torch.from_numpy(s.doc_ids[:, :-1].astype(np.int64))
    first = torch.searchsorted(doc, doc, side="left")  # index of each token's document start
    positions = torch.arange(seq).unsqueeze(0) - first
    small = doc.to(torch.int16 if seq < 2**15 else torch.int32)  # narrow ids: the s*s compare is the cost
    mask = small.unsqueeze(-1) == small.unsqueeze(-2)
    mask &= _causal(seq)
    return Batch(inputs, targets, positions, mask.unsqueeze(1))


@functools.lru_cache(maxsize=4)
def _causal(seq: int) -> torch.Tensor:
    return torch.ones(seq, seq, dtype=torch.bool).tril()


@dataclass
class Cursor:
    """Position in the global sample stream: samples consumed in all, and per source."""

    consumed: int
    counts: list[int]
    units: list[int]
    """Schedule units per source: samples, or loss tokens when sequences are padded (MixSchedule)."""


class DataLoader:
    """Micro-batches for (dp_rank, dp_size) over one or more weighted datasets."""

    def __init__(
        self,
        datasets: TokenDataset | list[TokenDataset],
        *,
        micro_batch_size: int,
        grad_accum: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        weights: list[float] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        document_mask: bool = False,
        prefetch: int = 0,
    ) -> None:
        self.datasets = datasets if isinstance(datasets, list) else [datasets]
        self.schedule = MixSchedule(weights or [1.0] * len(self.datasets))
        if len(self.schedule.weights) != len(self.datasets):
            raise ValueError(f"{len(weights or [])} weights for {len(self.datasets)} data.sources")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.mb, self.accum, self.dp_rank, self.dp_size = micro_batch_size, grad_accum, dp_rank, dp_size
        self.seed, self.shuffle, self.document_mask, self.prefetch = seed, shuffle, document_mask, prefetch
        self.global_batch = micro_batch_size * grad_accum * dp_size
        padded = any(d.packing != "concat" for d in self.datasets)
        self._cost = self._target_tokens if padded and len(self.datasets) > 1 else None
        self._cursor = Cursor(0, [0] * len(self.datasets), [0] * len(self.datasets))
        self._blocks: dict[tuple[int, int], np.ndarray] = {}
        self._prefetcher: _Prefetcher | None = None
        # this rank's positions in the global batch: micro-batch m is [(m*D + r)*mb, +mb)
        starts = (np.arange(grad_accum) * dp_size + dp_rank) * micro_batch_size
        self._mine = (starts[:, None] + np.arange(micro_batch_size)).ravel()

    # -- order ---------------------------------------------------------------------------------
    def _sample_ids(self, source: int, ordinals: np.ndarray) -> np.ndarray:
        """Dataset sample ids of a source's ordinals (its c-th sample overall, over all epochs).
        `ordinals` ascend (as the schedule produces them)."""
        if len(ordinals):  # ordinals ascend: the common case is one block (scalar checks, no array ops)
            first = int(ordinals[0]) // ID_BLOCK
            if int(ordinals[-1]) // ID_BLOCK == first:
                return self._id_block(source, first)[ordinals - first * ID_BLOCK]
        blocks = ordinals // ID_BLOCK
        out = np.empty(len(ordinals), dtype=np.int64)
        for b in np.unique(blocks).tolist():
            sel = blocks == b
            out[sel] = self._id_block(source, b)[ordinals[sel] - b * ID_BLOCK]
        return out

    def _id_block(self, source: int, block: int) -> np.ndarray:
        """Sample ids of ordinals [block * ID_BLOCK, (block + 1) * ID_BLOCK): the permutation is
        evaluated a block at a time so its per-call cost is amortised over many steps."""
        key = (source, block)
        ids = self._blocks.get(key)
        if ids is None:
            n = self.datasets[source].num_samples
            epochs, pos = np.divmod(np.arange(block * ID_BLOCK, (block + 1) * ID_BLOCK, dtype=np.int64), n)
            ids = pos.copy()
            if self.shuffle:
                for e in np.unique(epochs).tolist():
                    sel = epochs == e
                    ids[sel] = Permutation(n, derive_key(self.seed, source, e))(pos[sel])
            if len(self._blocks) >= 4 * len(self.datasets):
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[key] = ids
        return ids

    def _target_tokens(self, source: int, ordinal: int) -> int:
        return self.datasets[source].target_tokens(int(self._sample_ids(source, np.array([ordinal]))[0]))

    def _read(self, sources: np.ndarray, ordinals: np.ndarray) -> Samples:
        if len(self.datasets) == 1:
            return self.datasets[0].read(self._sample_ids(0, ordinals), self.document_mask)
        parts: list[tuple[np.ndarray, Samples]] = []
        for s in np.unique(sources).tolist():
            sel = np.flatnonzero(sources == s)
            parts.append((sel, self.datasets[s].read(self._sample_ids(s, ordinals[sel]), self.document_mask)))
        n, length = len(sources), self.datasets[0].length
        out = Samples(
            np.empty((n, length), np.int64),
            np.empty(n, np.int64),
            np.empty((n, length), np.int32) if self.document_mask else None,
            any(part.padded for _, part in parts),
        )
        for sel, part in parts:
            out.tokens[sel], out.valid[sel] = part.tokens, part.valid
            if out.doc_ids is not None:
                out.doc_ids[sel] = part.doc_ids
        return out

    def _build(self, cur: Cursor) -> tuple[list[Batch], Cursor]:
        """This rank's micro-batches for the step starting at `cur`, and the cursor after it."""
        mine = self._mine
        if len(self.datasets) == 1:  # no schedule: the source's ordinals are the global positions
            g = self.global_batch
            s = self.datasets[0].read(self._sample_ids(0, cur.counts[0] + mine), self.document_mask)
            counts, units = [cur.counts[0] + g], [cur.units[0] + g]
        else:
            sources, ordinals, counts, units = self.schedule.assign(
                cur.counts, self.global_batch, cur.units, self._cost
            )
            s = self._read(sources[mine], ordinals[mine])  # one read for the whole step
        if self.accum == 1:
            out = [collate(s, self.document_mask)]
        else:
            out = []
            for m in range(self.accum):
                sl = slice(m * self.mb, (m + 1) * self.mb)
                doc = None if s.doc_ids is None else s.doc_ids[sl]
                out.append(collate(Samples(s.tokens[sl], s.valid[sl], doc, s.padded), self.document_mask))
        return out, Cursor(cur.consumed + self.global_batch, counts, units)

    # -- iteration -----------------------------------------------------------------------------
    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step; advances the state by one global batch."""
        if self.prefetch > 0:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self._build, self._cursor, self.prefetch)
            try:
                batches, self._cursor = self._prefetcher.get()
            except BaseException:
                self._prefetcher = None  # it stopped itself; a retry restarts from the same state
                raise
        else:
            batches, self._cursor = self._build(self._cursor)
        return batches

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the prefetch thread (it restarts from the current state on the next step)."""
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()
            self._prefetcher = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def consumed(self) -> int:
        """Global samples handed to the trainer so far."""
        return self._cursor.consumed

    @consumed.setter
    def consumed(self, value: int) -> None:
        """Jump to global sample `value` (0 rewinds, e.g. to repeat the same validation batches)."""
        self.close()
        zeros = [0] * len(self.datasets)
        _, _, counts, units = self.schedule.assign(zeros, value, zeros, self._cost)
        self._cursor = Cursor(value, counts, units)

    @property
    def epoch(self) -> int:
        """Epoch of the first source (sources cycle independently: see `epochs`)."""
        return self.epochs[0]

    @property
    def epochs(self) -> list[int]:
        return [c // d.num_samples for c, d in zip(self._cursor.counts, self.datasets)]

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able state: the cursor plus what must match for the order to be the same."""
        return {
            "consumed": self._cursor.consumed,
            "source_consumed": list(self._cursor.counts),
            "source_units": list(self._cursor.units),
            "seed": self.seed,
            "num_samples": [d.num_samples for d in self.datasets],
            "weights": list(self.schedule.weights),
            "global_batch": self.global_batch,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved cursor; refuses when a change would alter the sample order."""
        if state.get("seed", self.seed) != self.seed:
            raise DataError(
                f"data.seed changed from {state['seed']} to {self.seed}: the sample order would differ"
            )
        sizes = [d.num_samples for d in self.datasets]
        if "num_samples" in state and list(state["num_samples"]) != sizes:
            names = ", ".join(d.loc.uri for d in self.datasets)
            raise DataError(
                f"data.sources ({names}) hold {sizes} samples but the checkpoint was taken with "
                f"{state['num_samples']} (changed data, data.seq_len or data.packing): the order would differ"
            )
        if "weights" in state and not np.allclose(
            state["weights"], self.schedule.weights, rtol=0, atol=1e-12
        ):
            raise DataError(
                f"data.sources weights changed from {state['weights']} to {self.schedule.weights}: "
                "the mixing schedule would differ"
            )
        self.close()
        counts = [int(c) for c in state.get("source_consumed", [state["consumed"]])]
        units = [int(u) for u in state.get("source_units", counts)]
        if len(counts) != len(self.datasets):
            raise DataError(f"checkpoint has {len(counts)} data.sources, the config {len(self.datasets)}")
        self._cursor = Cursor(int(state["consumed"]), counts, units)


class _Prefetcher:
    """Builds steps ahead in a daemon thread; hands them over, with the cursor after each, in order.

    The thread holds the loader only weakly, so a loader that is dropped without close() (e.g. a
    finished Trainer) is collected and its thread ends instead of idling with the shards mapped.
    """

    def __init__(self, build: Callable[[Cursor], tuple[list[Batch], Cursor]], start: Cursor, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._build = weakref.WeakMethod(build)
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True, name="data-prefetch")
        self._thread.start()

    def _put(self, item: object) -> None:
        while not self._stop.is_set() and self._build() is not None:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self, cur: Cursor) -> None:
        try:
            while not self._stop.is_set():
                build = self._build()
                if build is None:
                    return
                item = build(cur)
                del build
                cur = item[1]
                self._put(item)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(e)

    def get(self) -> tuple[list[Batch], Cursor]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if threading.current_thread() is self._thread:  # the loader was collected in this thread
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
