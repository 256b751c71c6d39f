"""Data pipeline schema: which Arrow shard datasets to read and how to turn them into batches."""

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass(kw_only=True)
class DataSourceConfig:
    """One tokenized dataset (a folder with index.json and Arrow shards) and its mixing weight."""

    path: str = MISSING
    """Folder (or fsspec/pyarrow URI) holding index.json and the shards."""
    weight: float = 1.0
    """Share of training *tokens* drawn from this source (weights are normalised to sum to 1)."""
    raw: str | None = None
    """Raw text to tokenize into `path` on first use when no index exists (`builtin:shakespeare`, a
    .txt/.jsonl[.gz]/.parquet file). Lets the quick start run with no separate prepare step."""


@dataclass(kw_only=True)
class DataConfig:
    """How tokens are streamed, shuffled, mixed and packed into fixed-length sequences."""

    sources: list[DataSourceConfig] = field(default_factory=list)
    """Training datasets; at least one is required."""
    tokenizer: str = "byte"
    """Tokenizer the shards must have been made with: `byte`, or a path to a HF tokenizer.json or a
    sentencepiece .model. Checked against each dataset's index."""
    seq_len: int = 256
    """Tokens per training sequence (each sample reads seq_len + 1 tokens for the shifted target)."""
    seed: int = 1234
    """Shuffle seed; the order is a pure function of (seed, epoch, dataset)."""
    shuffle: bool = True
    """Shuffle sequences across and within shards each epoch."""
    packing: str = "concat"
    """How documents become sequences: `concat` (cut the EOS-separated stream into seq_len windows;
    documents may be split) or `whole_documents` (never split a document that fits; pad the rest of
    the sequence and mask its loss)."""
    document_mask: bool = False
    """Block attention across document boundaries inside a packed sequence (and reset positions)."""
    val_split: str = "val"
    """Name of the validation split folder inside each dataset (skipped when absent)."""
    prefetch: int = 2
    """Batches prepared ahead of the training step by a background thread (0 = synchronous)."""
    mmap_release_every: int = 0
    """Samples read between unmapping the shard pages they touched (0 = never). Set it (e.g. 64) to
    keep RSS flat: mapped page cache otherwise counts in RSS; unmapping costs re-faults (docs/data.md)."""
    verify_checksums: bool = False
    """Hash every shard against index.json at open (slow for big data; always done by tools)."""
