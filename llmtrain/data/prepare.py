"""Raw text -> tokenized Arrow shards (the library side of tools/prepare_data.py).

Inputs: .txt (one document per file), .jsonl / .jsonl.gz (one JSON object per line, text in
`text_field`), .parquet (a `text_field` column); a folder means every such file in it, sorted.
Worker processes tokenize chunks of documents; the main process writes shards in input order, so the
output is the same for any number of workers. Re-running with the same inputs (path, size, mtime),
tokenizer and settings verifies the existing shards' checksums and does nothing else.
"""

import gzip
import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np

from llmtrain.data.errors import DataError
from llmtrain.data.format import FORMAT_VERSION, INDEX_NAME, DatasetIndex, verify_shard, write_shard
from llmtrain.data.fs import resolve
from llmtrain.data.tokenizer import Tokenizer, load_tokenizer

BUILTIN = {"shakespeare": "shakespeare.jsonl.gz"}
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet")


def resolve_raw(spec: "str | Path | list[str | Path]") -> list[Path]:
    """`builtin:<name>`, a file, or a folder (all supported files below it, sorted) -> input files;
    a list of those -> their files in the order given."""
    if isinstance(spec, list | tuple):
        return [f for s in spec for f in resolve_raw(s)]
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise ValueError(f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN)}")
        return [Path(str(resources.files("llmtrain") / "assets" / BUILTIN[name]))]
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{p}: no {', '.join(SUFFIXES)} files in this folder")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"{p}: raw input does not exist")
    return [p]


def iter_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one .txt, .jsonl[.gz] or .parquet file; a malformed record names file and line."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        text = json.loads(line)[text_field]
                    except (ValueError, KeyError, TypeError) as e:
                        raise DataError(
                            f"{path}:{line_no}: no '{text_field}' field in JSON line ({e})"
                        ) from e
                    if not isinstance(text, str):
                        raise DataError(
                            f"{path}:{line_no}: '{text_field}' is {type(text).__name__}, not text"
                        )
                    yield text
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no '{text_field}' column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[text_field]):
            yield from (t or "" for t in batch.column(0).to_pylist())
    else:
        yield path.read_text(encoding="utf-8")


def fingerprint(files: list[Path], tok: Tokenizer, **settings: object) -> str:
    """What the output depends on: input files (path, size, mtime), tokenizer identity, settings."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps([FORMAT_VERSION, stats, tok.identity, sorted(settings.items())], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


_WORKER_TOK: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOK
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_TOK = load_tokenizer(spec)


def _encode(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (flat uint32 tokens with EOS after each document, per-document lengths)."""
    docs = [ids + [tok.eos_id] for ids in tok.encode_batch(texts)]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter((t for d in docs for t in d), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_TOK is not None
    return _encode(_WORKER_TOK, texts)


def _chunks(files: list[Path], text_field: str, size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for f in files:
        for text in iter_texts(f, text_field):
            chunk.append(text)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _encoded(files, text_field, tok, spec, workers, chunk_docs) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded chunks in input order; at most 4 chunks per worker in flight (bounded memory)."""
    chunks = _chunks(files, text_field, chunk_docs)
    if workers <= 1 or spec is None:
        yield from (_encode(tok, c) for c in chunks)
        return
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (c,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _reuse(out: Path, fp: str, splits: list[Path], force: bool) -> DatasetIndex | None:
    """The existing index when it was made from the same inputs and settings and its shards verify."""
    try:
        existing = DatasetIndex.load(out)
    except DataError:
        return None
    if existing.fingerprint != fp or force:
        return None
    for folder in splits:
        if folder != out and not (folder / INDEX_NAME).is_file():
            continue  # a split that received no document
        index, loc = DatasetIndex.load(folder), resolve(str(folder))
        for info in index.shards:
            verify_shard(loc, info)  # a damaged shard stops the tool: re-run with --force to rebuild
    return existing


def prepare_dataset(
    raw: "str | Path | list[str | Path]",
    out: str | Path,
    tokenizer: str | Tokenizer = "byte",
    shard_tokens: int = 1 << 24,
    val_fraction: float = 0.0,
    text_field: str = "text",
    workers: int = 1,
    progress: bool = False,
    force: bool = False,
    chunk_docs: int = 256,
) -> DatasetIndex:
    """Tokenize `raw` into `out` (train split) and `out/val` (when val_fraction > 0: document i goes
    to val when floor((i+1)*f) > floor(i*f), an even spread of exactly that fraction)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    spec = tokenizer if isinstance(tokenizer, str) else None
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    files, out = resolve_raw(raw), Path(out)
    fp = fingerprint(files, tok, shard_tokens=shard_tokens, val_fraction=val_fraction, text_field=text_field)
    folders = {"train": out, "val": out / "val"}
    splits = [folders["train"]] + ([folders["val"]] if val_fraction > 0 else [])
    if (index := _reuse(out, fp, splits, force)) is not None:
        return index
    source = ",".join(str(f) for f in files)
    for folder in folders.values():  # the index goes first: a half-rebuilt dataset has none
        (folder / INDEX_NAME).unlink(missing_ok=True)
        for stale in folder.glob("shard_*.arrow*"):
            stale.unlink()
    writers = {k: _SplitWriter(folders[k], tok, shard_tokens, source, fp) for k in ("train", "val")}
    from tqdm import tqdm

    bar = tqdm(desc=f"tokenizing -> {out}", unit="doc", disable=not progress, dynamic_ncols=True)
    n_docs = n_tokens = 0
    for flat, lengths in _encoded(files, text_field, tok, spec, workers, chunk_docs):
        i = n_docs + np.arange(len(lengths))
        is_val = np.floor((i + 1) * val_fraction) > np.floor(i * val_fraction)
        tok_val = np.repeat(is_val, lengths)
        writers["val"].add(flat[tok_val], lengths[is_val])
        writers["train"].add(flat[~tok_val], lengths[~is_val])
        n_docs, n_tokens = n_docs + len(lengths), n_tokens + len(flat)
        bar.update(len(lengths))
        bar.set_postfix(tokens=f"{n_tokens:,}", shards=len(writers["train"].index.shards))
    bar.close()
    if n_docs == 0:
        raise DataError(f"{source}: no documents found")
    val = writers["val"]
    if val.index.shards or val.lengths:  # no val folder at all when no document went there
        val.finish()
    return writers["train"].finish()


class _SplitWriter:
    """Accumulates encoded documents and cuts shards of ~shard_tokens at document boundaries."""

    def __init__(self, folder: Path, tok: Tokenizer, shard_tokens: int, source: str, fp: str) -> None:
        self.folder, self.shard_tokens = folder, shard_tokens
        self.index = DatasetIndex(
            tokenizer=tok.identity,
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            source=source,
            fingerprint=fp,
        )
        self.tokens: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.pending = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        while len(lengths):
            ends = np.cumsum(lengths)
            k = min(
                int(np.searchsorted(ends, self.shard_tokens - self.pending, side="left")) + 1, len(lengths)
            )
            self.tokens.append(flat[: ends[k - 1]])
            self.lengths.append(lengths[:k])
            self.pending += int(ends[k - 1])
            flat, lengths = flat[ends[k - 1] :], lengths[k:]
            if self.pending >= self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if not self.lengths:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"shard_{len(self.index.shards):05d}.arrow"
        info = write_shard(path, np.concatenate(self.tokens), np.concatenate(self.lengths))
        self.index.shards.append(info)
        self.index.num_documents += info.num_documents
        self.index.num_tokens += info.num_tokens
        self.tokens, self.lengths, self.pending = [], [], 0

    def finish(self) -> DatasetIndex:
        self._flush()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index.save(self.folder)
        return self.index
