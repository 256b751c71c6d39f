"""A tokenized dataset split seen as `num_samples` fixed-length samples of seq_len + 1 tokens.

Packing modes (`data.packing`):
- `concat`: documents (each ending in EOS) are concatenated and cut into windows of seq_len + 1
  tokens; consecutive windows share one token (the last target of one is the first input of the
  next). Every position carries loss; a document may be split across samples.
- `whole_documents`: documents are packed greedily, in order, into sequences of at most seq_len + 1
  tokens without being split; the rest of a sequence is padding (pad_id input, loss masked). Only a
  document longer than a sequence is cut, into seq_len + 1 pieces.
Samples never straddle a record batch (format.BATCH_TOKENS), so a sample is one contiguous view.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmtrain.data.errors import DataError
from llmtrain.data.format import DatasetIndex
from llmtrain.data.fs import Location, resolve
from llmtrain.data.remote import remote_shards
from llmtrain.data.shard import ShardReader

PACKING_MODES = ("concat", "whole_documents")
LAYOUT_CACHE = 256
RELEASE_EVERY = 0
"""Default samples read between unmapping the shard pages they touched (0 = never; see shard.py).
Unmapping bounds the file-backed resident set whatever the dataset size, but every later access
re-faults a whole page-cache folio (~30 us here), so it is off unless RSS must stay flat."""
"""whole_documents: packed layouts (two int64 per sequence) kept for this many record batches."""


@dataclass
class Samples:
    """n samples: tokens (n, seq_len + 1) int64, valid token count per sample (the rest is padding)
    and, when asked for, the document index of every token within its sample (n, seq_len + 1)."""

    tokens: np.ndarray
    valid: np.ndarray
    doc_ids: np.ndarray | None = None
    padded: bool = False
    """Some sample is shorter than seq_len + 1 (whole_documents): its tail must not carry loss."""


def pack_layout(offsets: np.ndarray, length: int) -> np.ndarray:
    """Greedy in-order packing of documents into sequences of <= length tokens: (k, 2) [start, stop)
    token ranges. A sequence ends at the last document end that fits; a document longer than
    `length` is cut into `length`-token pieces. Sequences of fewer than 2 tokens carry no target and
    are dropped."""
    ends, total = offsets[1:].astype(np.int64), int(offsets[-1])
    out, p = [], 0
    while p < total:
        k = int(np.searchsorted(ends, p + length, side="right")) - 1
        q = int(ends[k]) if k >= 0 and ends[k] > p else min(p + length, total)
        if q - p >= 2:
            out.append((p, q))
        p = q
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


class TokenDataset:
    """Random access to the samples of one dataset split (a folder, URI or Location)."""

    def __init__(
        self,
        folder: "str | Location",
        seq_len: int,
        *,
        packing: str = "concat",
        verify_checksums: bool = False,
        filesystem: Any = None,
        release_every: int = RELEASE_EVERY,
    ) -> None:
        if packing not in PACKING_MODES:
            raise DataError(
                f"data.packing={packing!r} is not allowed; choose one of: {', '.join(PACKING_MODES)}"
            )
        self.loc = folder if isinstance(folder, Location) else resolve(str(folder), filesystem)
        self.index = DatasetIndex.load(self.loc)
        self.seq_len, self.length, self.packing = seq_len, seq_len + 1, packing
        self.verify, self.release_every = verify_checksums, release_every
        self.pad_id = self.index.pad_id
        self.segments = [
            (s, b) for s, info in enumerate(self.index.shards) for b in range(len(info.batch_tokens))
        ]
        self._readers: dict[int, ShardReader] = {}
        self._remote = None if self.loc.mmap else remote_shards(self.loc, self.index.shards, verify_checksums)
        """Not memory-mappable (object storage, fsspec): ranged reads of the samples' bytes (remote.py)."""
        self._layouts: OrderedDict[int, np.ndarray] = OrderedDict()
        self._seg_shard = np.array([sh for sh, _ in self.segments], dtype=np.int64)
        self._views: list[np.ndarray | None] = [None] * len(self.segments)
        """Token values per segment once opened, when they are mmap views (kept: they cost nothing)."""
        self._since_release = 0
        self._touched: set[int] = set()
        self._valid_cache: dict[int, np.ndarray] = {}
        if packing == "concat":
            counts = [max((self.index.shards[s].batch_tokens[b] - 1) // seq_len, 0) for s, b in self.segments]
        else:
            counts = [len(self._layout(i)) for i in range(len(self.segments))]
        self._touched.update(self._readers)
        self.release()  # whole_documents read every offsets buffer to count the sequences
        self.cum = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.num_samples = int(self.cum[-1])
        if self.num_samples == 0:
            raise DataError(
                f"{self.loc.uri}: no sample of seq_len + 1 = {self.length} tokens fits in any record batch"
            )

    def __len__(self) -> int:
        return self.num_samples

    def _batch(self, seg: int) -> tuple[np.ndarray, np.ndarray]:
        shard, b = self.segments[seg]
        reader = self._readers.get(shard)
        if reader is None:
            reader = self._readers[shard] = ShardReader(self.loc, self.index.shards[shard], self.verify)
        out = reader.batch(b)
        if reader.zero_copy:
            self._views[seg] = out[0]
        return out

    def _layout(self, seg: int) -> np.ndarray:
        lay = self._layouts.get(seg)
        if lay is None:
            offsets = self._remote.offsets(*self.segments[seg]) if self._remote else self._batch(seg)[1]
            lay = self._layouts[seg] = pack_layout(offsets, self.length)
            if len(self._layouts) > LAYOUT_CACHE:
                self._layouts.popitem(last=False)
        return lay

    def release(self) -> None:
        """Unmap the shard pages touched since the last release (they stay in the page cache)."""
        for shard in self._touched:
            if shard in self._readers:  # a shard that failed to open is not in _readers
                self._readers[shard].release()
        self._touched.clear()
        self._since_release = 0

    def locate(self, ids: np.ndarray, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Sample ids -> (record batch segment, sample number within it). check=False leaves the range
        check to the caller (an out-of-range id then maps to segment -1 or len(segments))."""
        ids = np.asarray(ids, dtype=np.int64)
        if check and len(ids) and ids.view(np.uint64).max() >= self.num_samples:  # negatives wrap to huge
            raise IndexError(f"sample id out of range [0, {self.num_samples})")
        seg = self.cum.searchsorted(ids, side="right") - 1
        return seg, ids - self.cum[seg]

    def target_tokens(self, sample: int) -> int:
        """Loss-carrying tokens of one sample (seq_len unless it is padded)."""
        if self.packing == "concat":
            return self.seq_len
        seg, j = self.locate(np.array([sample]))
        p, q = self._layout(int(seg[0]))[int(j[0])]
        return int(q - p - 1)

    def _full_valid(self, n: int) -> np.ndarray:
        """A read-only `valid` array of n full-length samples, shared between calls (the hot path)."""
        v = self._valid_cache.get(n)
        if v is None:
            v = np.full(n, self.length, dtype=np.int64)
            v.flags.writeable = False
            self._valid_cache[n] = v
        return v

    def read(self, ids: np.ndarray, doc_ids: bool = False) -> Samples:
        """Copy the given samples into one (n, seq_len + 1) int64 array (the only copy made)."""
        hot = self.packing == "concat" and not doc_ids and self._remote is None
        segs, local = self.locate(ids, check=not hot)
        if self._remote is not None:
            return self._read_remote(segs, local, doc_ids)  # the hot loop checks each segment itself
        n, length = len(segs), self.length
        tokens = np.empty((n, length), dtype=np.int64)
        docs = np.zeros((n, length), dtype=np.int32) if doc_ids else None
        if self.release_every:  # bookkeeping only when pages are unmapped (a few us per step otherwise)
            if self._since_release >= self.release_every:
                self.release()
            self._since_release += n
            self._touched.update(self._seg_shard[segs].tolist())
        if hot:  # no layout, no document ids: a few scalar operations per sample
            seq, views, nseg = self.seq_len, self._views, len(self._views)
            for i, (seg, j) in enumerate(zip(segs.tolist(), local.tolist())):
                if not 0 <= seg < nseg:
                    raise IndexError(f"sample id out of range [0, {self.num_samples})")
                v = views[seg]
                if v is None:
                    v = self._batch(seg)[0]
                tokens[i] = v[j * seq : j * seq + length]
            return Samples(tokens, self._full_valid(n))
        valid = np.full(n, length, dtype=np.int64)
        for i, (seg, j) in enumerate(zip(segs.tolist(), local.tolist())):
            values, offsets = self._batch(seg)
            p, q = self._span(seg, j)
            self._fill(tokens, docs, valid, i, values[p:q], offsets, p)
        return Samples(tokens, valid, docs, bool(valid.min(initial=length) < length))

    def _span(self, seg: int, j: int) -> tuple[int, int]:
        """Token range [p, q) of sample j of record batch segment seg."""
        if self.packing == "concat":
            return j * self.seq_len, j * self.seq_len + self.length
        p, q = self._layout(seg)[j].tolist()
        return p, q

    def _fill(
        self, tokens: np.ndarray, docs: np.ndarray | None, valid: np.ndarray, i: int, values: np.ndarray,
        offsets: np.ndarray | None, p: int,
    ) -> None:  # fmt: skip
        """Row i of a batch from the sample's tokens (padding, valid count, document ids)."""
        k = len(values)
        tokens[i, :k] = values
        if k < self.length:
            valid[i] = k
            tokens[i, k:] = self.pad_id
        if docs is not None:
            # document number of each token relative to the first; padding is one more document
            docs[i, :k] = np.searchsorted(offsets, np.arange(p, p + k), side="right")
            docs[i, :k] -= docs[i, 0]
            docs[i, k:] = docs[i, k - 1] + 1

    def _read_remote(self, segs: np.ndarray, local: np.ndarray, doc_ids: bool) -> Samples:
        """read() for shards behind ranged reads: the spans of all samples of a record batch are
        fetched in one request to the block cache (concurrent GETs for what it misses)."""
        n, length = len(segs), self.length
        tokens = np.empty((n, length), dtype=np.int64)
        docs = np.zeros((n, length), dtype=np.int32) if doc_ids else None
        valid = np.full(n, length, dtype=np.int64)
        spans = [self._span(seg, j) for seg, j in zip(segs.tolist(), local.tolist())]
        for seg in dict.fromkeys(segs.tolist()):
            rows = np.flatnonzero(segs == seg).tolist()
            shard, b = self.segments[seg]
            offsets = self._remote.offsets(shard, b) if doc_ids else None
            for i, values in zip(rows, self._remote.tokens(shard, b, [spans[i] for i in rows])):
                self._fill(tokens, docs, valid, i, values, offsets, spans[i][0])
        return Samples(tokens, valid, docs, bool(valid.min(initial=length) < length))
