"""Load a DCP checkpoint straight into the live tensors: read each tensor's bytes from the file into
the destination's own storage, without an intermediate buffer and copy (docs/checkpoints.md, "Cold
load in place"; measured in bench/restart.py and docs/benchmarks.md).

torch's `FileSystemReader` unpickles every item with `torch.load` into a fresh tensor (allocating and
page-faulting a buffer the size of the item) and then copies it into the tensor of the state dict the
caller passed: two passes over memory per byte read, CPU-bound at ~0.1-0.3x of the disk's sequential
read rate on our machines. DCP writes each tensor item as a `torch.save` archive (an uncompressed zip:
a small `data.pkl` plus the raw storage record, 64-byte aligned). `InPlaceReader` reads the pickle with
an allow-listed unpickler that only records the tensor's layout (no object is built), and when the
stored tensor is exactly the destination (same dtype and shape, contiguous, the whole storage, the
whole item requested, no storage transforms, little-endian) it `readinto`s the raw record directly
into the destination's memory, in file order. Anything else (a resharded read of part of an item, a
dtype change, an unknown pickle) takes torch's own path for that item, so the result is the same bytes
either way: the resume tests stay bitwise.
"""

import io
import math
import pickle
import struct
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future


class _Layout:
    """What `_rebuild_tensor_v2` would have been called with, without building anything."""

    def __init__(self, storage: tuple, offset: int, size: tuple, stride: tuple, *_rest: Any) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _Storage:
    """Stands for a typed storage class (torch.FloatStorage ...) in the pickle: carries its dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


_STORAGES = {
    f"{name}Storage": _Storage(dtype)
    for name, dtype in {
        "Float": torch.float32,
        "Double": torch.float64,
        "Half": torch.float16,
        "BFloat16": torch.bfloat16,
        "Long": torch.int64,
        "Int": torch.int32,
        "Short": torch.int16,
        "Char": torch.int8,
        "Byte": torch.uint8,
        "Bool": torch.bool,
    }.items()
}
"""The typed storage classes a tensor pickle names (other dtypes take torch's path)."""


class _LayoutUnpickler(pickle.Unpickler):
    """Allow-list: the tensor rebuild function, typed storage classes, OrderedDict (the empty hooks)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Layout
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid  # ('storage', storage class, key, location, numel)


def _contiguous_strides(size: tuple) -> tuple:
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


_HEAD = 4096
"""Bytes read at each end of a tensor item: the pickle and the record headers sit in the first, the
zip central directory in the last (a few hundred bytes each for a torch.save archive)."""


def _zip_records(head: bytes, tail: bytes, length: int) -> dict[str, tuple[int, int]] | None:
    """{record name: (data offset, size)} of a stored (uncompressed) zip archive of `length` bytes
    whose first bytes are `head` and last bytes `tail`; None when it is not the plain archive
    torch.save writes (zip64, compression), so the caller falls back. Records whose header lies beyond
    `head` are left out."""
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    count, cd_size, cd_offset = struct.unpack("<HII", tail[at + 10 : at + 20])
    tail_start = length - len(tail)
    if cd_offset == 0xFFFFFFFF or cd_offset < tail_start:
        return None
    cd, pos, out = tail[cd_offset - tail_start : cd_offset - tail_start + cd_size], 0, {}
    for _ in range(count):
        if cd[pos : pos + 4] != b"PK\x01\x02":
            return None
        method, size = struct.unpack("<H8xI", cd[pos + 10 : pos + 24])
        nlen, elen, clen = struct.unpack("<HHH", cd[pos + 28 : pos + 34])
        (local,) = struct.unpack("<I", cd[pos + 42 : pos + 46])
        name = cd[pos + 46 : pos + 46 + nlen].decode()
        pos += 46 + nlen + elen + clen
        if method != 0 or size == 0xFFFFFFFF or local == 0xFFFFFFFF:
            return None
        if local + 30 > len(head):  # a record after the tensor data (version, serialization id)
            continue
        if head[local : local + 4] != b"PK\x03\x04":
            return None
        lnlen, lelen = struct.unpack("<HH", head[local + 26 : local + 30])
        out[name.split("/", 1)[-1]] = (local + 30 + lnlen + lelen, size)
    return out


def _record(head: bytes, records: dict[str, tuple[int, int]], name: str) -> bytes | None:
    at, size = records.get(name, (0, -1))
    return head[at : at + size] if size >= 0 and at + size <= len(head) else None


def _raw_record(f: IO[bytes], start: int, length: int, dest: torch.Tensor) -> int | None:
    """Absolute file offset of the raw bytes of the tensor archived at [start, start+length) when they
    are exactly `dest`'s bytes, else None (the caller falls back to torch's path)."""
    f.seek(start)
    if length <= 2 * _HEAD:
        head = tail = f.read(length)
    else:
        head = f.read(_HEAD)
        f.seek(start + length - _HEAD)
        tail = f.read(_HEAD)
    records = _zip_records(head, tail, length)
    if records is None:
        return None
    order, pkl = _record(head, records, "byteorder"), _record(head, records, "data.pkl")
    if pkl is None or order not in (None, b"little"):
        return None
    layout = _LayoutUnpickler(io.BytesIO(pkl)).load()
    if not isinstance(layout, _Layout) or not isinstance(layout.storage, tuple) or len(layout.storage) != 5:
        return None
    _tag, storage, key, _location, numel = layout.storage
    at, size = records.get(f"data/{key}", (0, -1))
    ok = (
        isinstance(storage, _Storage)
        and storage.dtype == dest.dtype
        and layout.offset == 0
        and layout.size == tuple(dest.shape)
        and numel == math.prod(layout.size)
        and layout.stride == _contiguous_strides(layout.size)
        and size == dest.numel() * dest.element_size()
    )
    return start + at if ok else None


class _PlainUnpickler(pickle.Unpickler):
    """Plain Python values only (numbers, strings, tuples, lists, dicts, None): no class, no storage."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("storage")


def decode_plain(raw: bytes) -> Any:
    """A non-tensor DCP item (torch.save of an optimizer hyper-parameter and the like), decoded
    safely: the allow-nothing unpickler when the pickle is plain, else torch.load(weights_only=True)."""
    records = _zip_records(raw, raw, len(raw))
    pkl = None if records is None else _record(raw, records, "data.pkl")
    if pkl is not None:
        try:
            return _PlainUnpickler(io.BytesIO(pkl)).load()
        except pickle.UnpicklingError:
            pass
    return torch.load(io.BytesIO(raw), weights_only=True)


class SafeBytesPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor items are decoded by `decode_plain` instead of
    an unrestricted torch.load: loads through it need no separate per-item safety pass."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = decode_plain(value.getvalue())
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _into(f: IO[bytes], offset: int, dest: torch.Tensor) -> None:
    """readinto `dest`'s own memory from `offset` (dest is contiguous on the CPU)."""
    buf = memoryview(dest.view(-1).view(torch.uint8).numpy())
    f.seek(offset)
    done = 0
    while done < len(buf):
        got = f.readinto(buf[done:])
        if not got:
            raise OSError(f"{getattr(f, 'name', 'shard')}: ends before offset {offset + len(buf)}")
        done += got


READ_THREADS = 4
"""Shard files read at once (a rank's own shards; 1 file: no thread)."""


class InPlaceReader(FileSystemReader):
    """`FileSystemReader` whose tensor reads land in the destination tensors' storage (see module)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.in_place = self.fallback = 0

    def _in_place_target(self, req: ReadItem, planner: LoadPlanner) -> torch.Tensor | None:
        info = self.storage_data[req.storage_index]
        if req.type == LoadItemType.BYTE_IO or info.transform_descriptors or sys.byteorder != "little":
            return None
        dest = planner.resolve_tensor(req).detach()
        whole = all(o == 0 for o in req.storage_offsets) and tuple(req.lengths) == tuple(dest.shape)
        ok = whole and dest.device.type == "cpu" and dest.is_contiguous() and dest.numel() > 0
        return dest if ok else None

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        jobs = [(path, reqs, planner) for path, reqs in per_file.items()]
        if len(jobs) > 1:  # one reader thread per shard file (readinto releases the GIL)
            with ThreadPoolExecutor(min(READ_THREADS, len(jobs))) as pool:
                done = list(pool.map(lambda job: self._read_file(*job), jobs))
        else:
            done = [self._read_file(*job) for job in jobs]
        rest = [req for file_rest, _n in done for req in file_rest]
        self.in_place, self.fallback = sum(n for _rest, n in done), len(rest)
        if rest:  # torch's own path (buffer + copy) for the items that cannot be read in place
            super().read_data(LoadPlan(rest, plan.storage_data, plan.planner_data), planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_file(self, relative_path: str, reqs: list[ReadItem], planner: LoadPlanner) -> tuple[list, int]:
        """One shard file: first the small reads (non-tensor items, each tensor archive's pickle and
        directory), then every tensor's raw bytes in file order, one sequential sweep. Returns the
        requests left for torch's reader and the number read in place."""
        reqs = sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset)
        rest: list[ReadItem] = []
        todo: list[tuple[int, torch.Tensor, ReadItem]] = []
        with open(Path(self.path) / relative_path, "rb", buffering=0) as f:
            small = self._small_items(f, reqs)
            for req in reqs:
                found = self._locate(f, req, planner, small)
                if found is None:
                    rest.append(req)
                elif found is not True:
                    todo.append((*found, req))
            for offset, dest, req in sorted(todo, key=lambda t: t[0]):
                _into(f, offset, dest)
                planner.commit_tensor(req, dest)
        return rest, len(todo)

    def _small_items(self, f: IO[bytes], reqs: list[ReadItem]) -> dict[int, bytes]:
        """The non-tensor items of a file, read with one read of the span they occupy (DCP writes
        them together, before the tensors): {offset: bytes}. Empty when they are spread out."""
        infos = [self.storage_data[r.storage_index] for r in reqs if r.type == LoadItemType.BYTE_IO]
        if not infos:
            return {}
        lo, hi = min(i.offset for i in infos), max(i.offset + i.length for i in infos)
        if hi - lo > 4 * sum(i.length for i in infos) + (1 << 20):
            return {}
        f.seek(lo)
        block = f.read(hi - lo)
        return {i.offset: block[i.offset - lo : i.offset - lo + i.length] for i in infos}

    def _locate(self, f: IO[bytes], req: ReadItem, planner: LoadPlanner, small: dict[int, bytes]) -> Any:
        """True: a non-tensor item, loaded now; (offset, dest): a tensor to read in place; None: for
        torch's reader."""
        info = self.storage_data[req.storage_index]
        if req.type == LoadItemType.BYTE_IO and not info.transform_descriptors:
            raw = small.get(info.offset)
            if raw is None:
                f.seek(info.offset)
                raw = f.read(info.length)
            planner.load_bytes(req, io.BytesIO(raw))
            return True
        dest = self._in_place_target(req, planner)
        if dest is None:
            return None
        try:
            offset = _raw_record(f, info.offset, info.length, dest)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, struct.error):
            offset = None
        return None if offset is None else (offset, dest)


def load_in_place(state: dict[str, Any], folder: Path, no_dist: bool) -> InPlaceReader:
    """`dcp.load(state, folder)` through `InPlaceReader`; returns the reader (its in_place / fallback
    counts say how many items took each path)."""
    reader = InPlaceReader(folder)
    dcp.load(
        state, checkpoint_id=str(folder), storage_reader=reader, planner=SafeBytesPlanner(), no_dist=no_dist
    )
    return reader
