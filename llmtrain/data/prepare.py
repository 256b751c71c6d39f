"""Raw text -> tokenized Arrow shards (library side of tools/prepare_data.py)."""

import gzip
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from llmtrain.data.format import DatasetIndex, write_shard
from llmtrain.data.tokenizer import Tokenizer, load_tokenizer

BUILTIN = {"shakespeare": "shakespeare.jsonl.gz"}


def resolve_raw(spec: str) -> Path:
    """`builtin:<name>` -> the corpus shipped in llmtrain/assets; anything else is a path."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise ValueError(f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN)}")
        return Path(str(resources.files("llmtrain") / "assets" / BUILTIN[name]))
    return Path(spec)


def iter_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a .txt (one document per file), .jsonl[.gz] or .parquet file."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)[text_field]
                    except (ValueError, KeyError) as e:
                        raise ValueError(
                            f"{path}:{line_no}: no '{text_field}' field in JSON line ({e})"
                        ) from e
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
            yield from batch.column(0).to_pylist()
    else:
        yield path.read_text(encoding="utf-8")


def prepare_dataset(
    raw: str,
    out: str | Path,
    tokenizer: str | Tokenizer = "byte",
    shard_tokens: int = 1 << 24,
    val_fraction: float = 0.0,
    text_field: str = "text",
) -> DatasetIndex:
    """Tokenize raw text into `out` (train split) and `out/val` (every k-th document when val_fraction > 0).

    Idempotent: an existing index with the same source and tokenizer is kept as is.
    """
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    src = resolve_raw(raw)
    out = Path(out)
    try:
        existing = DatasetIndex.load(out)
        if existing.tokenizer == tok.identity and existing.source == str(src):
            return existing
    except ValueError:
        pass
    every = round(1 / val_fraction) if val_fraction > 0 else 0
    splits = {"train": out, "val": out / "val"}
    writers = {
        k: _SplitWriter(p, tok, shard_tokens, str(src)) for k, p in splits.items() if k == "train" or every
    }
    for i, text in enumerate(iter_texts(src, text_field)):
        split = "val" if every and i % every == every - 1 else "train"
        writers[split].add(tok.encode(text) + [tok.eos_id])
    indexes = {k: w.finish() for k, w in writers.items()}
    return indexes["train"]


class _SplitWriter:
    def __init__(self, folder: Path, tok: Tokenizer, shard_tokens: int, source: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.shard_tokens = folder, shard_tokens
        self.index = DatasetIndex(
            tokenizer=tok.identity,
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            source=source,
        )
        self.docs: list[list[int]] = []
        self.pending = 0

    def add(self, doc: list[int]) -> None:
        self.docs.append(doc)
        self.pending += len(doc)
        if self.pending >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self.docs:
            return
        info = write_shard(self.folder / f"shard_{len(self.index.shards):05d}.arrow", self.docs)
        self.index.shards.append(info)
        self.index.num_documents += info.num_documents
        self.index.num_tokens += info.num_tokens
        self.docs, self.pending = [], 0

    def finish(self) -> DatasetIndex:
        self._flush()
        self.index.save(self.folder)
        return self.index
