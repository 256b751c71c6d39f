"""Raw text -> tokenized Arrow shards (the library side of tools/prepare_data.py).

Inputs: .txt (one document per file), .jsonl / .jsonl.gz (one JSON object per line, text in
`text_field`), .parquet (a `text_field` column); a folder means every such file in it, sorted.
Worker processes tokenize chunks of documents; the main process writes shards in input order, so the
output is the same for any number of workers. Re-running with the same inputs (path, size, mtime),
tokenizer and settings verifies the existing shards' checksums and does nothing else.

A build writes into a hidden sibling folder (`.<out>.prepare-<host>-<pid>-*`) and swaps its files
into `out` only when every document was tokenized: a malformed input line, an empty input or an
interrupted run leaves an existing dataset at `out` exactly as it was.
"""

import glob
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

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


class _Cursor:
    """How far the input has been read, for progress lines: bytes of the files finished plus the
    position in the file being read (compressed bytes for .gz)."""

    def __init__(self, files: list[Path]) -> None:
        self.total = sum(f.stat().st_size for f in files)
        self.done = 0
        self.current: io.BufferedReader | None = None

    def bytes_read(self) -> int:
        here = self.current.tell() if self.current is not None and not self.current.closed else 0
        return min(self.done + here, self.total)


def _json_text(record_line: str, where: str, text_field: str) -> str:
    """The text of one JSON line; each kind of mistake is reported as what it is."""
    try:
        record = json.loads(record_line)
    except ValueError as e:
        detail = (
            f"{e.msg.removesuffix(' at')} at column {e.colno}"
            if isinstance(e, json.JSONDecodeError)
            else str(e)
        )
        raise DataError(f"{where}: malformed JSON ({detail})") from e
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}, not an object with a '{text_field}' field")
    if text_field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: no '{text_field}' field (keys: {keys}; choose one with --text-field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: '{text_field}' is {type(text).__name__}, not text")
    return text


def _jsonl_texts(path: Path, text_field: str, cursor: "_Cursor | None") -> Iterator[str]:
    with open(path, "rb") as raw:
        if cursor is not None:
            cursor.current = raw
        binary = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        line_no = 0
        try:
            for line_no, line in enumerate(io.TextIOWrapper(binary, encoding="utf-8"), 1):
                if line.strip():
                    yield _json_text(line, f"{path}:{line_no}", text_field)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line_no + 1}: not UTF-8 text ({e.reason})") from e
        except (OSError, EOFError) as e:  # a truncated or non-gzip .gz
            raise DataError(f"{path}:{line_no + 1}: unreadable ({e})") from e


def iter_texts(path: Path, text_field: str = "text", cursor: "_Cursor | None" = None) -> Iterator[str]:
    """Documents of one .txt, .jsonl[.gz] or .parquet file; a malformed record names file and line,
    an empty .txt file is refused (it would be a document of no tokens)."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        yield from _jsonl_texts(path, text_field, cursor)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no '{text_field}' column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[text_field]):
            yield from (t or "" for t in batch.column(0).to_pylist())
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        if not text:
            raise DataError(f"{path}: empty file (a .txt file is one document; remove it or add text)")
        yield text
    if cursor is not None:
        cursor.current, cursor.done = None, cursor.done + path.stat().st_size


def fingerprint(files: list[Path], tok: Tokenizer, **settings: object) -> str:
    """What the output depends on: input files (path, size, mtime), tokenizer identity, settings."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps([FORMAT_VERSION, stats, tok.identity, sorted(settings.items())], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


_WORKER_TOK: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    """Pool worker start. Forked workers inherit the parent's signal handlers: a trainer's (or the
    launcher's) graceful-stop handler would only set a flag on the SIGTERM by which the pool ends its
    workers, and the pool would wait for them forever. They get the default actions back."""
    global _WORKER_TOK
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
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


def _chunks(files: list[Path], text_field: str, size: int, cursor: _Cursor) -> Iterator[list[str]]:
    chunk: list[str] = []
    for f in files:
        for text in iter_texts(f, text_field, cursor):
            chunk.append(text)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _encoded(
    chunks: Iterator[list[str]], tok: Tokenizer, spec: str | None, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded chunks in input order; at most 4 chunks per worker in flight (bounded memory)."""
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


class _Progress:
    """Progress of one build. On a terminal: a tqdm bar. Otherwise (a log file, a pipe, SLURM output):
    one plain line every `every_s` seconds and a last one when done, never carriage-return updates."""

    def __init__(self, out: Path, enabled: bool, every_s: float, cursor: _Cursor) -> None:
        self.desc, self.cursor, self.every_s = f"tokenizing -> {out}", cursor, every_s
        self.enabled, self.tty = enabled, enabled and sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(desc=self.desc, unit="doc", dynamic_ncols=True)

    def update(self, new_docs: int, docs: int, tokens: int, shards: int) -> None:
        if self.bar is not None:
            self.bar.update(new_docs)
            self.bar.set_postfix(tokens=f"{tokens:,}", shards=shards)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self._line(docs, tokens, shards)

    def close(self, docs: int, tokens: int, shards: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix(tokens=f"{tokens:,}", shards=shards)
            self.bar.close()
        elif self.enabled:
            self._line(docs, tokens, shards, done=True)

    def _line(self, docs: int, tokens: int, shards: int, done: bool = False) -> None:
        read, total = self.cursor.bytes_read(), max(self.cursor.total, 1)
        pct = 100.0 if done else 100.0 * read / total
        print(
            f"{self.desc}: {pct:.0f}% of {total / 1e6:,.1f} MB read, {docs:,} documents, "
            f"{tokens:,} tokens, shards={shards} [{time.monotonic() - self.t0:.0f}s]{' done' if done else ''}",
            file=sys.stderr,
            flush=True,
        )


def _stage_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{socket.gethostname()}-"


def _remove_dead_stages(out: Path) -> None:
    """Staging folders of earlier builds of `out` on this host whose process is gone (killed)."""
    prefix = _stage_prefix(out, "prepare")
    for stage in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = stage.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return True


def _is_dataset_entry(name: str) -> bool:
    """What a build owns inside `out`: the index, the shards and the validation split folder."""
    return name in (INDEX_NAME, "val") or name.startswith("shard_")


def _swap_in(stage: Path, out: Path) -> None:
    """Replace the dataset files of `out` by those built in `stage` (same filesystem: renames). The
    old index leaves first and the new one arrives last, so no moment shows a readable mixed
    dataset; other files a user keeps in `out` stay where they are."""
    out.mkdir(exist_ok=True)
    old = Path(tempfile.mkdtemp(prefix=f"{_stage_prefix(out, 'replaced')}{os.getpid()}-", dir=out.parent))
    present = sorted(
        (e.name for e in out.iterdir() if _is_dataset_entry(e.name)), key=lambda n: n != INDEX_NAME
    )
    for name in present:
        os.rename(out / name, old / name)
    for entry in sorted(stage.iterdir(), key=lambda e: e.name == INDEX_NAME):
        os.rename(entry, out / entry.name)
    shutil.rmtree(old)


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
    progress_every_s: float = 10.0,
) -> DatasetIndex:
    """Tokenize `raw` into `out` (train split) and `out/val` (when val_fraction > 0: document i goes
    to val when floor((i+1)*f) > floor(i*f), an even spread of exactly that fraction). Built aside
    and swapped in on success, so a failed build never touches a dataset already at `out`."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    spec = tokenizer if isinstance(tokenizer, str) else None
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    files, out = resolve_raw(raw), Path(out)
    fp = fingerprint(files, tok, shard_tokens=shard_tokens, val_fraction=val_fraction, text_field=text_field)
    splits = [out] + ([out / "val"] if val_fraction > 0 else [])
    if (index := _reuse(out, fp, splits, force)) is not None:
        return index
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_stages(out)
    stage = Path(tempfile.mkdtemp(prefix=f"{_stage_prefix(out, 'prepare')}{os.getpid()}-", dir=out.parent))
    try:
        cursor = _Cursor(files)
        writers = {k: _SplitWriter(f, tok, shard_tokens, ",".join(map(str, files)), fp)
                   for k, f in (("train", stage), ("val", stage / "val"))}  # fmt: skip
        chunks = _chunks(files, text_field, chunk_docs, cursor)
        bar = _Progress(out, progress, progress_every_s, cursor)
        index = _write_splits(_encoded(chunks, tok, spec, workers), writers, val_fraction, bar)
        _swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return index


def _write_splits(
    encoded: Iterator[tuple[np.ndarray, np.ndarray]],
    writers: "dict[str, _SplitWriter]",
    val_fraction: float,
    bar: _Progress,
) -> DatasetIndex:
    """Route each encoded document to its split's writer; refuse an input without a single token."""
    n_docs = n_tokens = 0
    for flat, lengths in encoded:
        i = n_docs + np.arange(len(lengths))
        is_val = np.floor((i + 1) * val_fraction) > np.floor(i * val_fraction)
        tok_val = np.repeat(is_val, lengths)
        writers["val"].add(flat[tok_val], lengths[is_val])
        writers["train"].add(flat[~tok_val], lengths[~is_val])
        n_docs, n_tokens = n_docs + len(lengths), n_tokens + len(flat)
        bar.update(len(lengths), n_docs, n_tokens, sum(len(w.index.shards) for w in writers.values()))
    source = writers["train"].index.source
    if n_docs == 0:
        raise DataError(f"{source}: no documents found")
    if n_tokens == n_docs:  # every document is just its EOS
        raise DataError(f"{source}: no tokens: every one of the {n_docs} documents is empty")
    val = writers["val"]
    if val.index.shards or val.lengths:  # no val folder at all when no document went there
        val.finish()
    index = writers["train"].finish()
    bar.close(n_docs, n_tokens, sum(len(w.index.shards) for w in writers.values()))
    return index


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


def prepare_to_uri(raw: "str | Path | list[str | Path]", uri: str, *args: Any, **kw: Any) -> DatasetIndex:
    """prepare_dataset into object storage (`s3://bucket/prefix`, any fsspec URI): built in a local
    temporary folder, then uploaded with the same ordering rule as a local build: the old index.json
    objects are deleted first, then the shards and val/ go up, and the new index.json files last, so no
    moment shows a readable mixture of two builds. (No rename on object stores: while an upload runs
    the dataset is unreadable, reported as a missing index.)"""
    from llmtrain.data.objstore import filesystem_for, put_tree

    fs, root = filesystem_for(uri)
    with tempfile.TemporaryDirectory(prefix="llmtrain-prepare-") as tmp:
        index = prepare_dataset(raw, Path(tmp) / "out", *args, **kw)
        for rel in (INDEX_NAME, f"val/{INDEX_NAME}"):
            if fs.exists(f"{root}/{rel}"):
                fs.rm_file(f"{root}/{rel}")
        put_tree(Path(tmp) / "out", uri, last=(f"val/{INDEX_NAME}", INDEX_NAME))
    return index
