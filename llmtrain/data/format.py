"""Shard format (DESIGN.md "Data"): Arrow IPC files with one `tokens: list<uint32>` row per document
(EOS appended), plus `index.json` describing the dataset. IPC files are uncompressed so that the
reader can memory-map them and view the token values without copying."""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.uint32()))])


class DataError(ValueError):
    """Bad data on disk: the message names the file."""


@dataclass
class ShardInfo:
    """One shard file as recorded in the index."""

    file: str
    num_documents: int
    num_tokens: int
    sha256: str
    bytes: int


@dataclass
class DatasetIndex:
    """The JSON index of a tokenized dataset (one split)."""

    tokenizer: str
    vocab_size: int
    eos_id: int
    pad_id: int
    num_documents: int = 0
    num_tokens: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    source: str = ""

    def save(self, folder: str | Path) -> None:
        """Write atomically: the index appears only once every shard it names is complete."""
        path = Path(folder) / INDEX_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: str | Path) -> "DatasetIndex":
        path = Path(folder) / INDEX_NAME
        if not path.is_file():
            raise DataError(
                f"{path}: missing dataset index (run tools/prepare_data.py on the raw text first)"
            )
        try:
            raw = json.loads(path.read_text())
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            index = cls(**raw)
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path}: unreadable dataset index ({e})") from e
        if index.format_version != FORMAT_VERSION:
            raise DataError(
                f"{path}: format_version {index.format_version}, this llmtrain reads {FORMAT_VERSION}"
            )
        return index


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(path: str | Path, docs: list[list[int]]) -> ShardInfo:
    """Write documents as one Arrow IPC shard (temp name, fsync, rename) and describe it."""
    path = Path(path)
    tmp = path.with_suffix(".arrow.tmp")
    arr = pa.array(docs, type=pa.list_(pa.uint32()))
    table = pa.Table.from_arrays([arr], schema=SCHEMA)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(table, max_chunksize=1 << 16)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return ShardInfo(
        file=path.name,
        num_documents=len(docs),
        num_tokens=int(sum(len(d) for d in docs)),
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
    )
