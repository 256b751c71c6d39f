"""Memory-mapped reading of a tokenized dataset: fixed-length windows over the token stream.

A shard's token values are one contiguous uint32 buffer inside the Arrow IPC file; the reader
memory-maps the file and views that buffer with numpy, so reading a window copies only the window.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmtrain.data.format import DataError, DatasetIndex


@dataclass
class Window:
    """seq_len + 1 tokens and, for document masking, the document start offsets inside them."""

    tokens: np.ndarray
    doc_starts: np.ndarray


class ShardReader:
    """One memory-mapped shard: flat token values plus document offsets."""

    def __init__(self, path: Path, expected_tokens: int) -> None:
        self.path = path
        try:
            source = pa.memory_map(str(path), "r")
            reader = pa.ipc.open_file(source)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            col = (
                pa.concat_arrays([b.column(0) for b in batches]) if len(batches) > 1 else batches[0].column(0)
            )
        except (OSError, pa.ArrowInvalid, IndexError) as e:
            raise DataError(f"{path}: not a readable Arrow shard ({e})") from e
        offsets = col.offsets.to_numpy(zero_copy_only=False)
        self.values = col.values.to_numpy(zero_copy_only=len(batches) == 1)
        self.doc_offsets = (offsets - offsets[0]).astype(np.int64)
        if self.values.dtype != np.uint32:
            raise DataError(f"{path}: tokens must be uint32, found {self.values.dtype}")
        if len(self.values) != expected_tokens:
            raise DataError(
                f"{path}: holds {len(self.values)} tokens but index.json says {expected_tokens} (truncated or replaced?)"
            )

    def window(self, start: int, length: int) -> Window:
        toks = np.asarray(self.values[start : start + length], dtype=np.int64)
        lo, hi = np.searchsorted(self.doc_offsets, [start, start + length], side="right")
        starts = self.doc_offsets[max(lo - 1, 0) : hi] - start
        return Window(toks, np.clip(starts, 0, None))


class TokenDataset:
    """A dataset split seen as `num_samples` windows of seq_len + 1 tokens (windows stay in a shard)."""

    def __init__(self, folder: str | Path, seq_len: int) -> None:
        self.folder = Path(folder)
        self.index = DatasetIndex.load(self.folder)
        self.seq_len = seq_len
        per_shard = [max((s.num_tokens - 1) // seq_len, 0) for s in self.index.shards]
        self.cum = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
        self.num_samples = int(self.cum[-1])
        if self.num_samples == 0:
            raise DataError(f"{self.folder}: fewer than seq_len + 1 = {seq_len + 1} tokens per shard")
        self._readers: dict[int, ShardReader] = {}

    def _reader(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            info = self.index.shards[shard]
            path = self.folder / info.file
            if not path.is_file():
                raise DataError(f"{path}: shard listed in {self.folder / 'index.json'} is missing")
            self._readers[shard] = ShardReader(path, info.num_tokens)
        return self._readers[shard]

    def __getitem__(self, i: int) -> Window:
        shard = int(np.searchsorted(self.cum, i, side="right") - 1)
        local = i - int(self.cum[shard])
        return self._reader(shard).window(local * self.seq_len, self.seq_len + 1)
