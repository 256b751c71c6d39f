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
into the destination's memory. Each shard file is read once, front to back (`_sweep_item`): a cold load
then runs at the disk's sequential rate (a first pass over the archives' headers and directories, then
a sweep over the data, ran at 0.68x of it: scattered small reads). Anything else (a resharded read of part of an item, a
dtype change, an unknown pickle) takes torch's own path for that item, so the result is the same bytes
either way: the resume tests stay bitwise.
"""

import io
import math
import os
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


def _layout_matches(layout: Any, dest: torch.Tensor) -> bool:
    """The unpickled layout is a whole, contiguous tensor of `dest`'s dtype and shape."""
    if not isinstance(layout, _Layout) or not isinstance(layout.storage, tuple) or len(layout.storage) != 5:
        return False
    _tag, storage, _key, _location, numel = layout.storage
    return (
        isinstance(storage, _Storage)
        and storage.dtype == dest.dtype
        and layout.offset == 0
        and layout.size == tuple(dest.shape)
        and numel == math.prod(layout.size)
        and layout.stride == _contiguous_strides(layout.size)
    )


def _local_data(head: bytes, at: int) -> tuple[str, int] | None:
    """(name, data offset) of the zip local file header at `at` of `head`, None if there is none."""
    if head[at : at + 4] != b"PK\x03\x04" or at + 30 > len(head):
        return None
    nlen, elen = struct.unpack("<HH", head[at + 26 : at + 30])
    if at + 30 + nlen > len(head):
        return None
    return head[at + 30 : at + 30 + nlen].decode(errors="replace"), at + 30 + nlen + elen


def _head_offset(head: bytes, dest: torch.Tensor) -> int | None:
    """Where the raw bytes of the tensor archive starting with `head` begin, judged from its first
    bytes alone (torch.save writes sizes after each record, so the directory at the end is what
    confirms it: `_checked_offset`, after the read). None: not a plain tensor archive of `dest`."""
    first = _local_data(head, 0)
    if first is None or not first[0].endswith("data.pkl"):
        return None
    prefix, pkl_at = first[0][: -len("data.pkl")], first[1]
    layout = _LayoutUnpickler(io.BytesIO(head[pkl_at:])).load()
    if not _layout_matches(layout, dest):
        return None
    name, at = f"{prefix}data/{layout.storage[2]}", head.find(b"PK\x03\x04", pkl_at)
    while at >= 0:
        found = _local_data(head, at)
        if found is not None and found[0] == name:
            return found[1]
        at = head.find(b"PK\x03\x04", at + 4)
    return None


def _checked_offset(head: bytes, tail: bytes, length: int, dest: torch.Tensor) -> int | None:
    """Offset, within the tensor archive of `length` bytes whose first bytes are `head` and last
    `tail`, of its raw storage record when that record is exactly `dest`'s bytes (per the archive's
    central directory), else None (the caller falls back to torch's path)."""
    records = _zip_records(head, tail, length)
    if records is None:
        return None
    order, pkl = _record(head, records, "byteorder"), _record(head, records, "data.pkl")
    if pkl is None or order not in (None, b"little"):
        return None
    layout = _LayoutUnpickler(io.BytesIO(pkl)).load()
    if not _layout_matches(layout, dest):
        return None
    at, size = records.get(f"data/{layout.storage[2]}", (0, -1))
    return at if size == dest.numel() * dest.element_size() else None


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


READ_AHEAD = 64 << 20
"""Bytes past the current tensor archive the kernel is asked to read ahead (posix_fadvise WILLNEED):
I/O then overlaps the unpickling and planning, which on a contended machine otherwise stall it."""

_PARSE_ERRORS = (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, struct.error)


def _readinto(f: IO[bytes], buf: memoryview) -> None:
    done = 0
    while done < len(buf):
        got = f.readinto(buf[done:])
        if not got:
            raise OSError(f"{getattr(f, 'name', 'shard')}: ends {len(buf) - done} bytes early")
        done += got


def _sweep_item(f: IO[bytes], start: int, length: int, dest: torch.Tensor) -> bool:
    """Read the tensor archive at [start, start+length) front to back: its first bytes (pickle and
    record headers), its raw record straight into `dest`'s memory, then its last bytes (the zip
    directory), which must confirm where the record was. One forward pass, no seek back. False: not
    read in place (`dest` may hold part of it; torch's path then overwrites all of it)."""
    if hasattr(os, "posix_fadvise"):  # the disk reads on while this thread parses and copies
        os.posix_fadvise(f.fileno(), start, length + READ_AHEAD, os.POSIX_FADV_WILLNEED)
    f.seek(start)
    head = f.read(min(_HEAD, length))
    try:
        at = _head_offset(head, dest)
    except _PARSE_ERRORS:
        at = None
    nbytes = dest.numel() * dest.element_size()
    if at is None or at + nbytes > length:
        return False
    buf = memoryview(dest.view(-1).view(torch.uint8).numpy())
    got = min(max(len(head) - at, 0), nbytes)  # small tensors lie within the first bytes
    buf[:got] = head[at : at + got]
    _readinto(f, buf[got:])
    end = at + nbytes
    if end <= len(head):
        tail = head[end:] + f.read(length - len(head))
    else:
        f.seek(start + max(end, length - _HEAD))
        tail = f.read(min(length - end, _HEAD))
    try:
        return _checked_offset(head, tail, length, dest) == at
    except _PARSE_ERRORS:
        return False


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
        """One shard file in one forward sweep (file order): the non-tensor items, then each tensor
        archive read front to back into its destination (`_sweep_item`). Returns the requests left
        for torch's reader and the number read in place."""
        reqs = sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset)
        rest: list[ReadItem] = []
        done = 0
        with open(Path(self.path) / relative_path, "rb", buffering=0) as f:
            small = self._small_items(f, reqs)
            for req in reqs:
                info = self.storage_data[req.storage_index]
                if req.type == LoadItemType.BYTE_IO and not info.transform_descriptors:
                    raw = small.get(info.offset)
                    if raw is None:
                        f.seek(info.offset)
                        raw = f.read(info.length)
                    planner.load_bytes(req, io.BytesIO(raw))
                    continue
                dest = self._in_place_target(req, planner)
                if dest is None or not _sweep_item(f, info.offset, info.length, dest):
                    rest.append(req)
                    continue
                planner.commit_tensor(req, dest)
                done += 1
        return rest, done

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


def load_in_place(state: dict[str, Any], folder: Path, no_dist: bool) -> InPlaceReader:
    """`dcp.load(state, folder)` through `InPlaceReader`; returns the reader (its in_place / fallback
    counts say how many items took each path)."""
    reader = InPlaceReader(folder)
    dcp.load(
        state, checkpoint_id=str(folder), storage_reader=reader, planner=SafeBytesPlanner(), no_dist=no_dist
    )
    return reader
