"""Shards on object storage (or any filesystem that cannot be memory-mapped), read with ranged reads.

Reading a record batch through pyarrow would fetch its whole body (up to 16 MB for one 8 KB
sample), so a remote shard is opened differently: the Arrow IPC footer and each record batch's
metadata are parsed here (a few hundred bytes of flatbuffers per batch) to learn where the batch's
document offsets and token values lie in the file. A sample then costs the ranged reads of the
`storage.block_kb` blocks that cover its tokens. Blocks are cached per dataset (`storage.cache_mb`,
least recently used dropped first); with `storage.read_ahead=N` the blocks missing for one request
are fetched concurrently (one `cat_ranges` call: s3fs issues the GETs in parallel) and the next N
blocks of the same record batch are fetched in the background, so sequential reading overlaps with
the network. The token bytes are the file's own, so samples equal the memory-mapped local ones bit
for bit (tests/storage).
"""

import struct
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from llmtrain.data.errors import DataError
from llmtrain.data.format import INDEX_NAME, ShardInfo, verify_shard
from llmtrain.data.fs import Location
from llmtrain.data.shard import check_present

MAGIC = b"ARROW1"
TAIL = 1 << 16
"""Bytes read from the end of a shard at open (footer length + footer; one more read if larger)."""


@dataclass(frozen=True)
class BatchLayout:
    """Absolute file offsets of one record batch's document offsets (int32) and token values (uint32)."""

    offsets_at: int
    values_at: int


def _u(fmt: str, buf: bytes, at: int) -> int:
    return struct.unpack_from(fmt, buf, at)[0]


def _field(buf: bytes, table: int, i: int) -> int:
    """Position of field i of the flatbuffer table at `table`, or 0 when the field is absent."""
    vtable = table - _u("<i", buf, table)
    if 4 + 2 * i >= _u("<H", buf, vtable):
        return 0
    off = _u("<H", buf, vtable + 4 + 2 * i)
    return table + off if off else 0


def _deref(buf: bytes, at: int) -> int:
    return at + _u("<I", buf, at)


def _vector(buf: bytes, table: int, i: int) -> tuple[int, int]:
    """(first element position, length) of the vector in field i."""
    at = _field(buf, table, i)
    if not at:
        return 0, 0
    vec = _deref(buf, at)
    return vec + 4, _u("<I", buf, vec)


def footer_blocks(tail: bytes) -> list[tuple[int, int]]:
    """(offset, metadata length) of every record batch, from the IPC file footer (Footer.recordBatches,
    a vector of Block structs {offset: int64, metaDataLength: int32, bodyLength: int64})."""
    if tail[-6:] != MAGIC:
        raise ValueError("no Arrow IPC file magic at the end")
    size = _u("<i", tail, len(tail) - 10)
    footer = tail[len(tail) - 10 - size : len(tail) - 10]
    if len(footer) != size:
        raise ValueError("footer longer than the bytes read")
    first, n = _vector(footer, _deref(footer, 0), 3)
    return [(_u("<q", footer, first + 24 * k), _u("<i", footer, first + 24 * k + 8)) for k in range(n)]


def batch_layout(meta: bytes, block_offset: int, num_tokens: int) -> BatchLayout:
    """Where the list offsets and values of a `tokens: list<uint32>` batch lie, from its message
    (Message.header = RecordBatch; RecordBatch.buffers = [list validity, offsets, value validity, values])."""
    start = 8 if _u("<i", meta, 0) == -1 else 4  # continuation marker, then the flatbuffer length
    fb = meta[start:]
    message = _deref(fb, 0)
    if fb[_field(fb, message, 1)] != 3:  # MessageHeader.RecordBatch
        raise ValueError("block is not a record batch")
    header = _deref(fb, _field(fb, message, 2))
    if _field(fb, header, 3):
        raise ValueError("compressed record batch")
    first, n = _vector(fb, header, 2)
    buffers = [(_u("<q", fb, first + 16 * k), _u("<q", fb, first + 16 * k + 8)) for k in range(n)]
    if n != 4 or buffers[1][1] < 8 or buffers[3][1] < 4 * num_tokens:
        raise ValueError(f"unexpected buffer layout {buffers}")
    body = block_offset + len(meta)
    return BatchLayout(body + buffers[1][0], body + buffers[3][0])


class RangeReader:
    """Ranged reads of one dataset's files, through fsspec (`cat_ranges`, concurrent) when the Location
    has it, else through pyarrow's `read_at`."""

    def __init__(self, folder: Location) -> None:
        self.folder = folder
        self._handles: dict[str, object] = {}

    def read(self, path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        ffs = self.folder.ranged
        if ffs is not None and len(ranges) > 1:
            return list(ffs.cat_ranges([path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges]))
        if ffs is not None:
            return [ffs.cat_file(path, start=ranges[0][0], end=ranges[0][1])]
        f = self._handles.get(path) or self._handles.setdefault(path, self.folder.fs.open_input_file(path))
        return [f.read_at(b - a, a).to_pybytes() for a, b in ranges]


class RemoteShard:
    """One shard on a remote filesystem: its batch layouts, read at open (two or three small reads)."""

    def __init__(self, folder: Location, info: ShardInfo, reader: RangeReader) -> None:
        self.loc, self.info = folder.child(info.file), info
        check_present(self.loc, info)
        size = info.bytes
        try:
            (tail,) = reader.read(self.loc.path, [(max(size - TAIL, 0), size)])
            if len(tail) >= 10 and _u("<i", tail, len(tail) - 10) + 10 > len(tail):
                (tail,) = reader.read(self.loc.path, [(0, size)])  # a huge footer: read it whole
            blocks = footer_blocks(tail)
            if len(blocks) != len(info.batch_tokens):
                raise ValueError(
                    f"{len(blocks)} record batches but {INDEX_NAME} lists {len(info.batch_tokens)}"
                )
            metas = reader.read(self.loc.path, [(o, o + m) for o, m in blocks])
            self.layouts = [batch_layout(m, o, n) for m, (o, _), n in zip(metas, blocks, info.batch_tokens)]
        except (ValueError, struct.error, IndexError) as e:
            raise DataError(f"{self.loc.uri}: not a readable Arrow IPC shard ({e})") from e


class BlockCache:
    """Fixed-size blocks of a dataset's shard files: LRU-bounded, with concurrent and read-ahead fetches."""

    def __init__(self, reader: RangeReader, block: int, capacity: int, read_ahead: int) -> None:
        self.reader, self.block, self.capacity, self.read_ahead = reader, block, max(capacity, 1), read_ahead
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._inflight: dict[tuple[str, int], Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-read-ahead") if read_ahead else None
        self.requests = self.bytes_read = 0
        """Ranged reads issued and bytes they returned (for tests and the benchmark)."""

    def _fetch(self, path: str, keys: list[int], size: int) -> dict[int, bytes]:
        ranges = [(k * self.block, min((k + 1) * self.block, size)) for k in keys]
        if self.read_ahead:
            datas = self.reader.read(path, ranges)
        else:  # no concurrency: one request at a time
            datas = [self.reader.read(path, [r])[0] for r in ranges]
        self.requests += len(ranges)
        self.bytes_read += sum(map(len, datas))
        with self._lock:
            for k, d in zip(keys, datas):
                self._blocks[(path, k)] = d
                self._blocks.move_to_end((path, k))
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
        return dict(zip(keys, datas))

    def get_many(self, path: str, size: int, spans: list[tuple[int, int]], limit: int) -> list[bytes]:
        """Bytes of each [start, stop) span of file `path`; read-ahead stays below `limit` (the end of
        the record batch's values)."""
        need = sorted({k for a, b in spans for k in range(a // self.block, (b - 1) // self.block + 1)})
        have: dict[int, bytes] = {}
        waits: dict[int, Future] = {}
        with self._lock:
            for k in need:
                if (path, k) in self._blocks:
                    self._blocks.move_to_end((path, k))
                    have[k] = self._blocks[(path, k)]
                elif (path, k) in self._inflight:
                    waits[k] = self._inflight[(path, k)]
        missing = [k for k in need if k not in have and k not in waits]
        if missing:
            have.update(self._fetch(path, missing, size))
        for k, fut in waits.items():
            have[k] = fut.result()[k]
        self._read_ahead(path, size, need[-1] + 1, limit)
        out = []
        for a, b in spans:
            first = a // self.block
            joined = b"".join(have[k] for k in range(first, (b - 1) // self.block + 1))
            out.append(joined[a - first * self.block : b - first * self.block])
        return out

    def _read_ahead(self, path: str, size: int, start: int, limit: int) -> None:
        if self._pool is None:
            return
        stop = min(start + self.read_ahead, (limit - 1) // self.block + 1)
        with self._lock:
            keys = [
                k
                for k in range(start, stop)
                if (path, k) not in self._blocks and (path, k) not in self._inflight
            ]
            if not keys:
                return
            fut = self._pool.submit(self._fetch, path, keys, size)
            for k in keys:
                self._inflight[(path, k)] = fut
        fut.add_done_callback(lambda _f: self._done(path, keys))

    def _done(self, path: str, keys: list[int]) -> None:
        with self._lock:
            for k in keys:
                self._inflight.pop((path, k), None)


class RemoteShards:
    """Every shard of one dataset split on a remote filesystem, opened on first use."""

    def __init__(
        self,
        folder: Location,
        shards: list[ShardInfo],
        verify: bool,
        block: int,
        cache_bytes: int,
        ahead: int,
    ) -> None:
        self.folder, self.infos, self.verify = folder, shards, verify
        self.reader = RangeReader(folder)
        self.cache = BlockCache(self.reader, block, cache_bytes // block, ahead)
        self._open: dict[int, RemoteShard] = {}
        self._offsets: dict[tuple[int, int], np.ndarray] = {}

    def shard(self, s: int) -> RemoteShard:
        sh = self._open.get(s)
        if sh is None:
            if self.verify:  # asked for: this reads the whole shard once
                verify_shard(self.folder, self.infos[s])
            sh = self._open[s] = RemoteShard(self.folder, self.infos[s], self.reader)
        return sh

    def tokens(self, s: int, b: int, spans: list[tuple[int, int]]) -> list[np.ndarray]:
        """uint32 tokens [p, q) of record batch b of shard s, for each (p, q)."""
        sh = self.shard(s)
        at, n = sh.layouts[b].values_at, sh.info.batch_tokens[b]
        raw = self.cache.get_many(
            sh.loc.path, sh.info.bytes, [(at + 4 * p, at + 4 * q) for p, q in spans], at + 4 * n
        )
        return [np.frombuffer(r, dtype="<u4") for r in raw]

    def offsets(self, s: int, b: int) -> np.ndarray:
        """int32 document offsets of record batch b (read once; small)."""
        key = (s, b)
        if key not in self._offsets:
            sh = self.shard(s)
            at, n = sh.layouts[b].offsets_at, sh.info.batch_tokens[b]
            (raw,) = self.reader.read(sh.loc.path, [(at, sh.layouts[b].values_at)])
            offs = np.frombuffer(raw, dtype="<i4")
            # the buffer is padded: it ends at the first offset equal to n after the start
            ends = np.flatnonzero(offs == n)
            if offs[0] != 0 or not len(ends):
                raise DataError(f"{sh.loc.uri}: record batch {b} has corrupt document offsets")
            self._offsets[key] = offs[: ends[0] + 1].copy()
        return self._offsets[key]


def remote_shards(folder: Location, shards: list[ShardInfo], verify: bool) -> RemoteShards:
    """The ranged-read shards of one split, sized by the process's storage settings (data/objstore.py)."""
    from llmtrain.data.objstore import settings

    s = settings()
    return RemoteShards(folder, shards, verify, s.block_kb << 10, s.cache_mb << 20, s.read_ahead)
