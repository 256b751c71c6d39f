"""The S3 rows of bench/data_throughput.py: the same loader reading the same shards from local disk
and from an S3 API on loopback (a moto server subprocess), with and without read-ahead.

Reads are what training does: DataLoader.next_step() of shuffled 8 x 8 sample steps (random record
batches, so read-ahead helps through concurrent GETs of a step's blocks) and of unshuffled steps
(sequential, where the background read-ahead of the next blocks overlaps with the caller). The
`fetched / used` column is the bytes the ranged reads returned per token byte delivered (1 = exactly
the samples' bytes; a full-shard download would be the shard size over the sample size).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.config.storage import StorageConfig
from llmtrain.data import objstore
from llmtrain.data.dataset import TokenDataset
from llmtrain.data.loader import DataLoader

FAKE_AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def available() -> bool:
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        return False
    return True


def _moto(port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _rate(ds: TokenDataset, shuffle: bool, mb: int, steps: int) -> float:
    dl = DataLoader(ds, micro_batch_size=mb, grad_accum=8, seed=1, shuffle=shuffle, prefetch=0)
    t0 = time.perf_counter()
    for _ in range(steps):
        dl.next_step()
    return steps * 8 * mb * ds.seq_len / (time.perf_counter() - t0)


def s3_rows(folder: Path, seq: int, mb: int, steps: int) -> list[dict[str, Any]]:
    """tokens/s of local disk vs S3 on loopback (16 / 256 KiB blocks, read_ahead 0 and 4) for shuffled
    and sequential steps."""
    import boto3

    os.environ.update({k: v for k, v in FAKE_AWS.items() if k not in os.environ})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, url = _moto(port), f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket="bench-data")
        for f in sorted(folder.iterdir()):
            if f.suffix in (".arrow", ".json"):
                client.upload_file(str(f), "bench-data", f"ds/{f.name}")
        rows = []
        for shuffle in (True, False):
            order = "shuffled" if shuffle else "sequential"
            local = _rate(TokenDataset(folder, seq), shuffle, mb, steps)
            rows.append({"source": "local disk (mmap)", "order": order, "tokens/s": local, "vs local": 1.0})
            for block_kb, ahead in ((16, 0), (16, 4), (256, 0), (256, 4)):
                objstore.configure(StorageConfig(endpoint_url=url, read_ahead=ahead, block_kb=block_kb))
                ds = TokenDataset("s3://bench-data/ds", seq)
                ids = np.arange(0, ds.num_samples, max(ds.num_samples // 64, 1))
                assert (ds.read(ids).tokens == TokenDataset(folder, seq).read(ids).tokens).all()
                ds = TokenDataset("s3://bench-data/ds", seq)  # a cold cache for the timing
                rate = _rate(ds, shuffle, mb, steps)
                used = steps * 8 * mb * (seq + 1) * 4
                rows.append({
                    "source": f"S3 loopback, block_kb={block_kb}, read_ahead={ahead}", "order": order,
                    "tokens/s": rate, "vs local": rate / local, "GETs/step": ds._remote.cache.requests / steps,
                    "fetched / used": ds._remote.cache.bytes_read / used,
                })  # fmt: skip
        return rows
    finally:
        objstore.configure(StorageConfig())
        server.terminate()
        server.wait(timeout=30)


def report(folder: Path, seq: int, mb: int, steps: int) -> list[dict[str, Any]]:
    """Run and print the S3 rows (a markdown table)."""
    from bench.common import print_table

    rows = s3_rows(folder, seq, mb, steps)
    print(f"\nS3 on loopback (moto server subprocess) vs local disk, seq_len {seq}, {mb} x 8 samples/step")
    print_table(rows, ["source", "order", "tokens/s", "vs local", "GETs/step", "fetched / used"])
    return rows
