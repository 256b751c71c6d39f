#!/usr/bin/env python
"""Tokenize raw text into Arrow shards for llmtrain (see docs/data.md).

  python tools/prepare_data.py INPUT... --out data/mycorpus --tokenizer byte --workers 8 --val-fraction 0.01
  python tools/prepare_data.py corpus.jsonl.gz --out data/c --tokenizer path/to/tokenizer.json --text-field content
  python tools/prepare_data.py --verify data/c            # re-hash every shard against index.json
  python tools/prepare_data.py corpus/ --out s3://bucket/corpus --endpoint-url http://minio:9000  # object store

INPUT: .txt (one document per file), .jsonl[.gz] (text in --text-field), .parquet (--text-field
column), a folder of those, or builtin:shakespeare. Several inputs become one dataset, in the order
given. Re-running with unchanged inputs and settings only verifies the existing shards.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.config.storage import StorageConfig
from llmtrain.data import objstore
from llmtrain.data.errors import DataError
from llmtrain.data.format import DatasetIndex, verify_shard
from llmtrain.data.fs import resolve
from llmtrain.data.prepare import prepare_dataset, prepare_to_uri


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="raw text files / folders / builtin:<name>")
    p.add_argument("--out", help="output dataset folder (train split; validation goes to OUT/val)")
    p.add_argument("--tokenizer", default="byte", help="byte | path/to/tokenizer.json | path/to/*.model")
    p.add_argument("--text-field", default="text", help="JSON key / Parquet column holding the text")
    p.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MB (4 bytes per token)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of documents for OUT/val")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    p.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="without a terminal (a log file): one progress line every SECONDS (default 10)",
    )
    p.add_argument("--verify", metavar="DATASET", help="only verify DATASET's shards against its index")
    p.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint for s3:// paths (credentials come from the AWS environment/config)",
    )
    args = p.parse_args(argv)
    if not args.verify and (not args.inputs or not args.out):
        p.error("give INPUT... and --out (or --verify DATASET)")
    return args


def verify(folder: str) -> int:
    """Hash every shard of a dataset (and of its val split) against the index."""
    loc = resolve(folder)
    total = 0
    for split in (loc, loc.child("val")):
        if split is not loc and not split.child("index.json").exists():
            continue
        index = DatasetIndex.load(split)
        for info in index.shards:
            verify_shard(split, info)
        total += len(index.shards)
        print(f"{split.uri}: {len(index.shards)} shards, {index.num_tokens:,} tokens verified")
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.endpoint_url:
        objstore.configure(StorageConfig(endpoint_url=args.endpoint_url))
    try:
        if args.verify:
            verify(args.verify)
            return 0
        t0 = time.perf_counter()
        build = prepare_to_uri if "://" in args.out else prepare_dataset
        index = build(
            args.inputs,
            args.out,
            args.tokenizer,
            shard_tokens=max(int(args.shard_mb * (1 << 20) / 4), 1),
            val_fraction=args.val_fraction,
            text_field=args.text_field,
            workers=args.workers,
            progress=not args.no_progress,
            force=args.force,
            progress_every_s=args.progress_every,
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(f"{args.out}: {describe(index)} ({index.tokenizer}) [{dt:.1f}s]")
    val = resolve(args.out).child("val")
    if val.child("index.json").exists():
        print(f"{val.uri}: {describe(DatasetIndex.load(val))} (validation split)")
    else:
        print(f"{val.uri}: none (--val-fraction {args.val_fraction} put no document there)")
    return 0


def describe(index: DatasetIndex) -> str:
    return f"{index.num_documents:,} documents, {index.num_tokens:,} tokens in {len(index.shards)} shards"


if __name__ == "__main__":
    sys.exit(main())
