"""Shard format (docs/data.md): Arrow IPC files with one `tokens: list<uint32>` row per document
(EOS appended), plus `index.json` describing the dataset split.

IPC files are uncompressed so the reader can memory-map them and view token values in place. A shard
holds a few record batches of at most BATCH_TOKENS tokens each: the batch is the unit a sample may
not cross (and the unit of I/O on non-local filesystems), and the index records each batch's token
count so that the sample space is known without opening a single shard.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmtrain.data.errors import DataError
from llmtrain.data.fs import Location, resolve

FORMAT_VERSION = 2
INDEX_NAME = "index.json"
SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.uint32()))])
BATCH_TOKENS = 1 << 22
"""Most tokens in one record batch (16 MB): large enough that samples rarely straddle a boundary."""

__all__ = ["INDEX_NAME", "DataError", "DatasetIndex", "ShardInfo", "sha256_file", "write_shard"]


@dataclass
class ShardInfo:
    """One shard file as recorded in the index."""

    file: str
    num_documents: int
    num_tokens: int
    sha256: str
    bytes: int
    batch_tokens: list[int] = field(default_factory=list)
    """Tokens in each record batch, in file order (they sum to num_tokens)."""


@dataclass
class DatasetIndex:
    """The JSON index of a tokenized dataset split."""

    tokenizer: str
    vocab_size: int
    eos_id: int
    pad_id: int
    num_documents: int = 0
    num_tokens: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    source: str = ""
    fingerprint: str = ""
    """Hash of the inputs (paths, sizes, mtimes) and settings that produced the shards: a re-run
    with the same fingerprint has nothing to do."""

    def save(self, folder: str | Path) -> None:
        """Write atomically: the index appears only once every shard it names is complete."""
        path = Path(folder) / INDEX_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: "str | Path | Location") -> "DatasetIndex":
        """Read `<folder>/index.json` (folder: a path, a URI or a Location); errors name the file."""
        loc = folder if isinstance(folder, Location) else resolve(str(folder))
        index_loc = loc.child(INDEX_NAME)
        if not index_loc.exists():
            raise DataError(
                f"{index_loc.uri}: missing dataset index (run tools/prepare_data.py on the raw text first)"
            )
        try:
            raw = json.loads(index_loc.read_text())
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            index = cls(**raw)
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{index_loc.uri}: unreadable dataset index ({e})") from e
        if index.format_version != FORMAT_VERSION:
            raise DataError(
                f"{index_loc.uri}: format_version {index.format_version}, this llmtrain reads "
                f"{FORMAT_VERSION}: re-run tools/prepare_data.py"
            )
        for s in index.shards:
            if sum(s.batch_tokens) != s.num_tokens:
                raise DataError(f"{index_loc.uri}: shard {s.file} batch_tokens do not sum to num_tokens")
        return index


def sha256_file(loc: "str | Path | Location", chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (local path or Location), read in chunks."""
    loc = loc if isinstance(loc, Location) else resolve(str(loc))
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_shard(folder: Location, info: ShardInfo) -> None:
    """Size and SHA-256 of one shard against the index; raises DataError naming the file."""
    loc = folder.child(info.file)
    if not loc.exists():
        raise DataError(f"{loc.uri}: shard listed in {INDEX_NAME} is missing")
    if loc.size() != info.bytes:
        raise DataError(f"{loc.uri}: {loc.size()} bytes but {INDEX_NAME} says {info.bytes} (truncated?)")
    digest = sha256_file(loc)
    if digest != info.sha256:
        raise DataError(
            f"{loc.uri}: checksum mismatch (sha256 {digest[:16]}..., {INDEX_NAME} says {info.sha256[:16]}...)"
        )


def batch_bounds(lengths: np.ndarray, max_tokens: int = BATCH_TOKENS) -> list[tuple[int, int]]:
    """Split documents (by length) into consecutive [first, last) runs of <= max_tokens tokens each
    (a longer document gets a batch of its own)."""
    bounds, first, ends = [], 0, np.cumsum(lengths)
    while first < len(lengths):
        base = ends[first - 1] if first else 0
        last = int(np.searchsorted(ends, base + max_tokens, side="right"))
        last = max(last, first + 1)
        bounds.append((first, last))
        first = last
    return bounds


def write_shard(
    path: str | Path, tokens: np.ndarray, lengths: np.ndarray, max_batch_tokens: int = BATCH_TOKENS
) -> ShardInfo:
    """Write documents (flat uint32 tokens + per-document lengths) as one Arrow IPC shard (temp name,
    fsync, rename) and describe it."""
    path = Path(path)
    tmp = path.with_suffix(".arrow.tmp")
    tokens = np.ascontiguousarray(tokens, dtype=np.uint32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if offsets[-1] != len(tokens):
        raise ValueError(f"{path}: lengths sum to {offsets[-1]} but {len(tokens)} tokens were given")
    batch_tokens = []
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        for first, last in batch_bounds(np.asarray(lengths), max_batch_tokens):
            lo, hi = int(offsets[first]), int(offsets[last])
            arr = pa.ListArray.from_arrays(
                pa.array((offsets[first : last + 1] - lo).astype(np.int32)), pa.array(tokens[lo:hi])
            )
            writer.write_batch(pa.record_batch([arr], schema=SCHEMA))
            batch_tokens.append(hi - lo)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return ShardInfo(
        file=path.name,
        num_documents=len(lengths),
        num_tokens=int(offsets[-1]),
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        batch_tokens=batch_tokens,
    )
