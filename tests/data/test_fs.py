"""Reading through filesystem URIs and objects gives the same samples; local reads are zero-copy."""

from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from llmtrain.data import TokenDataset
from llmtrain.data.fs import resolve
from tests.data.conftest import random_lengths

SEQ = 16


@pytest.fixture
def folder(synth) -> Path:
    return synth("d", random_lengths(80), docs_per_shard=20, max_batch_tokens=600)


def all_samples(ds: TokenDataset) -> np.ndarray:
    return ds.read(np.arange(ds.num_samples), doc_ids=True).tokens


def test_uri_and_filesystem_objects_read_the_same_samples(folder: Path) -> None:
    ref = all_samples(TokenDataset(folder, SEQ))
    via_uri = TokenDataset(f"file://{folder}", SEQ)
    assert via_uri.loc.mmap
    np.testing.assert_array_equal(all_samples(via_uri), ref)
    subtree = pafs.SubTreeFileSystem(str(folder.parent), pafs.LocalFileSystem())
    via_subtree = TokenDataset(folder.name, SEQ, filesystem=subtree)
    assert via_subtree.loc.mmap
    np.testing.assert_array_equal(all_samples(via_subtree), ref)


def test_fsspec_memory_filesystem_reads_byte_ranges(folder: Path) -> None:
    mem = fsspec.filesystem("memory")
    for f in folder.iterdir():
        mem.pipe(f"/llmtrain-test/{f.name}", f.read_bytes())
    try:
        for packing in ("concat", "whole_documents"):
            ds = TokenDataset("memory://llmtrain-test", SEQ, packing=packing)
            assert not ds.loc.mmap and not ds._readers  # ranged reads, no pyarrow batch reader
            np.testing.assert_array_equal(
                all_samples(ds), all_samples(TokenDataset(folder, SEQ, packing=packing))
            )
            assert ds._remote.cache.requests > 0
    finally:
        mem.rm("/llmtrain-test", recursive=True)


def test_local_reads_are_zero_copy(folder: Path) -> None:
    ds = TokenDataset(folder, SEQ)
    before = pa.total_allocated_bytes()
    all_samples(ds)  # opens every shard and views every record batch
    assert pa.total_allocated_bytes() - before == 0  # no Arrow buffer was allocated: all mmap views
    values, _ = ds._batch(0)
    assert not values.flags.owndata and not values.flags.writeable  # a read-only view of the map


def test_unknown_scheme_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="nosuchfs://x"):
        resolve("nosuchfs://x/data")
