"""One Arrow shard opened for reading: record batches as numpy views of the memory-mapped file.

Opening checks what is cheap and always worth checking (file present, size as indexed, readable IPC
footer, schema, batch count and per-batch token counts); `verify=True` also hashes the whole file
against the index. On a local filesystem the views are zero-copy; elsewhere each record batch is read
on first use and the last few are cached.

Page-table hygiene: every page fault on a mapped file maps a block of neighbouring cached pages too
(kernel fault-around, 64 KB), so random reads would make the resident set grow towards the size of
the data touched. That memory is page cache, not ours, but it shows up as RSS and competes with the
job; `release()` unmaps it (MADV_DONTNEED: the next access simply faults the page back from the page
cache), and the dataset calls it every RELEASE_EVERY samples, which keeps peak RSS flat.
"""

import mmap

import numpy as np
import pyarrow as pa

from llmtrain.data.errors import DataError
from llmtrain.data.format import INDEX_NAME, SCHEMA, ShardInfo, verify_shard
from llmtrain.data.fs import Location

REMOTE_CACHE = 2
"""Record batches kept per shard when the filesystem cannot be memory-mapped."""


def check_present(loc: Location, info: ShardInfo) -> None:
    """The shard file exists with the size the index recorded (a truncated or replaced file is named)."""
    if not loc.exists():
        raise DataError(f"{loc.uri}: shard listed in {INDEX_NAME} is missing")
    size = loc.size()
    if size != info.bytes:
        raise DataError(
            f"{loc.uri}: {size} bytes but {INDEX_NAME} says {info.bytes} (truncated or replaced?)"
        )


class ShardReader:
    """Token values and document offsets of one shard, per record batch."""

    def __init__(self, folder: Location, info: ShardInfo, verify: bool = False) -> None:
        self.loc, self.info = folder.child(info.file), info
        check_present(self.loc, info)
        if verify:
            verify_shard(folder, info)
        self._map: mmap.mmap | None = None
        try:
            if self.loc.local_path is not None:
                with open(self.loc.local_path, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self._map)))
            else:
                self._reader = pa.ipc.open_file(self.loc.open())
        except (OSError, ValueError, pa.ArrowInvalid) as e:
            raise DataError(f"{self.loc.uri}: not a readable Arrow IPC shard ({e})") from e
        if not self._reader.schema.equals(SCHEMA):
            raise DataError(f"{self.loc.uri}: schema {self._reader.schema} is not {SCHEMA}")
        if self._reader.num_record_batches != len(info.batch_tokens):
            raise DataError(
                f"{self.loc.uri}: {self._reader.num_record_batches} record batches but {INDEX_NAME} "
                f"lists {len(info.batch_tokens)}"
            )
        self.zero_copy = self._map is not None
        """Batches are views of a memory map: kept for the reader's lifetime (no cache limit)."""
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 token values, int32 document offsets starting at 0) of record batch i."""
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        try:
            col = self._reader.get_batch(i).column(0)
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.loc.uri}: record batch {i} is unreadable ({e})") from e
        n = self.info.batch_tokens[i]
        if values.dtype != np.uint32 or len(values) != n or offsets[0] != 0 or offsets[-1] != n:
            raise DataError(
                f"{self.loc.uri}: record batch {i} holds {len(values)} {values.dtype} tokens, "
                f"{INDEX_NAME} says {n} uint32 (corrupt shard?)"
            )
        if not self.zero_copy and len(self._cache) >= REMOTE_CACHE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[i] = (values, offsets)
        return values, offsets

    def release(self) -> None:
        """Drop this process's mappings of the file's pages (views stay valid; data stays cached)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
