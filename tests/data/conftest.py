"""Synthetic tokenized datasets for the data tests: written straight to shards (no tokenizer), with
token values that make every document and position recognisable."""

from pathlib import Path

import numpy as np
import pytest

from llmtrain.data.format import DatasetIndex, write_shard

EOS, PAD = 0, 1


def make_dataset(
    folder: Path,
    doc_lengths: list[int] | np.ndarray,
    *,
    docs_per_shard: int = 50,
    tokenizer: str = "synthetic-v1",
    max_batch_tokens: int | None = None,
    base: int = 0,
) -> DatasetIndex:
    """Documents of the given lengths (last token EOS), token value = 2 + base + doc * 1000 + pos
    (pos < 1000), split into shards of `docs_per_shard` documents."""
    folder.mkdir(parents=True, exist_ok=True)
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    index = DatasetIndex(tokenizer=tokenizer, vocab_size=1 << 31, eos_id=EOS, pad_id=PAD)
    kw = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
    for s, first in enumerate(range(0, len(lengths), docs_per_shard)):
        lens = lengths[first : first + docs_per_shard]
        docs = [
            np.append(2 + base + (first + d) * 1000 + np.arange(n - 1) % 1000, EOS)
            for d, n in enumerate(lens)
        ]
        info = write_shard(
            folder / f"shard_{s:05d}.arrow", np.concatenate(docs).astype(np.uint32), lens, **kw
        )
        index.shards.append(info)
        index.num_documents += info.num_documents
        index.num_tokens += info.num_tokens
    index.save(folder)
    return index


@pytest.fixture
def synth(tmp_path: Path):
    """Factory: synth(name, doc_lengths, **kw) -> dataset folder under tmp_path."""

    def make(name: str, doc_lengths, **kw) -> Path:
        make_dataset(tmp_path / name, doc_lengths, **kw)
        return tmp_path / name

    return make


def random_lengths(n: int, lo: int = 5, hi: int = 120, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, size=n)
