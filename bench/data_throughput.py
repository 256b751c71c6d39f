"""Tokens per second the data loader delivers to one process, against a plain numpy memmap read of
the same bytes and against what a (tiny) model consumes in training.

    .venv/bin/python bench/data_throughput.py               # table on stdout, JSON in bench/results/
    .venv/bin/python bench/data_throughput.py --tokens 64e6 --seq-len 4096

Setup: a synthetic dataset (random documents of 100-4000 tokens, uint32) is written as Arrow shards
and, for the baseline, the token stream of every record batch is also written to one flat .bin file.
Both are read once first (warm page cache). Then, in the same run and the same shuffled sample order:
  raw memmap   np.memmap of the .bin: for each sample copy its seq_len + 1 tokens into an int64
               batch array and split inputs/targets as torch tensors (the least any loader must do)
  loader       DataLoader.next_step() (shard lookup, Feistel shuffle, mmap views, collate to Batch)
Ratio = loader / raw memmap (target >= 0.9). Further rows: the reader alone (TokenDataset.read),
whole-document packing, document masks (O(s^2) mask per sample), the training consumption of the
tiny Llama (conf/model/tiny) as the rate the loader has to beat, and the share of a training step
spent waiting for data with prefetch on. Each timing is the best of --repeats. With moto[server] and
s3fs installed (or --s3 on), the same loader also reads the shards from an S3 API on loopback, with and
without read-ahead (bench/s3_data.py); --s3-only runs just that part on a --s3-mb dataset.
"""

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import s3_data  # noqa: E402
from llmtrain.data.dataset import TokenDataset  # noqa: E402
from llmtrain.data.format import DatasetIndex, write_shard  # noqa: E402
from llmtrain.data.loader import DataLoader  # noqa: E402


def build(folder: Path, num_tokens: int, shard_tokens: int, seed: int = 0) -> Path:
    """Synthetic shards + a flat .bin with each record batch's tokens (for the baseline)."""
    rng = np.random.default_rng(seed)
    index = DatasetIndex(tokenizer="synthetic", vocab_size=50_000, eos_id=0, pad_id=0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "flat.bin", "wb") as flat:
        for s in range((num_tokens + shard_tokens - 1) // shard_tokens):
            lengths = rng.integers(100, 4000, size=max(shard_tokens // 2050, 1))
            tokens = rng.integers(1, 50_000, size=int(lengths.sum()), dtype=np.uint32)
            info = write_shard(folder / f"shard_{s:05d}.arrow", tokens, lengths)
            index.shards.append(info)
            index.num_tokens += info.num_tokens
            tokens.tofile(flat)  # record batches are consecutive runs of the shard's token stream
    index.save(folder)
    return folder


def warm(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def raw_memmap_reader(folder: Path, ds: TokenDataset):
    """Returns read(ids) doing the minimal work on a plain memmap: same windows, same output."""
    import torch

    flat = np.memmap(folder / "flat.bin", dtype=np.uint32, mode="r").view(np.ndarray)  # no subclass cost
    seg_start = np.concatenate([[0], np.cumsum([ds.index.shards[s].batch_tokens[b] for s, b in ds.segments])])

    def read(ids: np.ndarray):
        segs, local = ds.locate(ids, check=False)  # the least work: no range check either
        starts = seg_start[segs] + local * ds.seq_len
        out = np.empty((len(ids), ds.length), dtype=np.int64)
        for i, st in enumerate(starts.tolist()):
            out[i] = flat[st : st + ds.length]
        t = torch.from_numpy(out)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    return read


TINY = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 320, "ffn_dim": 384}
"""conf/model/tiny.yaml"""


def tiny_train_step(seq_len: int, mb: int):
    """A step function of the tiny Llama (forward + backward + AdamW) on random tokens."""
    import torch

    from llmtrain.models.llama import Transformer, TransformerArgs

    torch.manual_seed(0)
    model = Transformer(TransformerArgs(**TINY, max_seq_len=seq_len))
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randint(0, TINY["vocab_size"], (mb, seq_len))

    def step() -> None:
        logits = model(x)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad()

    step()
    return step


def prefetch_wait(folder: Path, seq: int, mb: int, steps: int) -> tuple[float, float]:
    """Training with data.prefetch=2: (share of step time spent waiting for data, tokens/s)."""
    train = tiny_train_step(512, 8)
    dl = DataLoader(TokenDataset(folder, seq), micro_batch_size=mb, grad_accum=1, seed=1, prefetch=2)
    dl.next_step()
    wait = total = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        dl.next_step()
        t1 = time.perf_counter()
        train()
        wait, total = wait + t1 - t0, total + time.perf_counter() - t0
    dl.close()
    return wait / total, steps * mb * seq / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=32e6, help="dataset size in tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="dataset folder (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_throughput.json"))
    p.add_argument("--s3", choices=("auto", "on", "off"), default="auto", help="S3 loopback rows")
    p.add_argument("--s3-only", action="store_true", help="only the S3 rows (dataset of --s3-mb)")
    p.add_argument("--s3-mb", type=float, default=64, help="dataset size of the S3 rows (uploaded)")
    p.add_argument("--s3-steps", type=int, default=10, help="steps per S3 timing")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="llmtrain-bench-")
    if a.s3 != "off" and (a.s3 == "on" or s3_data.available()):
        small = build(Path(a.dir or tmp.name) / "s3ds", int(a.s3_mb * (1 << 18)), 1 << 22)
        s3_rows = s3_data.report(small, a.seq_len, a.micro_batch, a.s3_steps)
        out = Path(a.out).with_name(Path(a.out).stem + "_s3.json")
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": s3_rows}, indent=1))
        print(f"wrote {out}")
        if a.s3_only:
            return
    folder = build(Path(a.dir or tmp.name) / "ds", int(a.tokens), 1 << 24)
    warm(folder)
    seq, mb, steps = a.seq_len, a.micro_batch, a.steps
    ds = TokenDataset(folder, seq)
    raw = raw_memmap_reader(folder, ds)
    rows, ratios = {}, {}
    for accum in (1, 8):  # 8 samples per step, and 64 (8 micro-batches) per step
        dl = DataLoader(ds, micro_batch_size=mb, grad_accum=accum, seed=1)
        ids = [dl._sample_ids(0, np.arange(k * mb, (k + 1) * mb)) for k in range(steps * accum)]
        raw_t = load_t = 0.0
        # interleaved step by step (alternating which goes first), so that both see the same
        # machine state even when other processes compete for the cores
        for _ in range(a.repeats):
            dl.consumed = 0
            for k in range(steps):
                mine = ids[k * accum : (k + 1) * accum]
                t0 = time.perf_counter()
                if k % 2:
                    dl.next_step()
                t1 = time.perf_counter()
                for i in mine:
                    raw(i)
                t2 = time.perf_counter()
                if not k % 2:
                    dl.next_step()
                t3 = time.perf_counter()
                raw_t, load_t = raw_t + t2 - t1, load_t + (t1 - t0) + (t3 - t2)
        tokens = a.repeats * steps * accum * mb * seq
        name = f"{mb} x {accum} samples/step"
        rows[f"raw numpy memmap, {name}"] = tokens / raw_t
        rows[f"DataLoader.next_step, {name}"] = tokens / load_t
        ratios[name] = raw_t / load_t
    unmapping = DataLoader(TokenDataset(folder, seq, release_every=64), micro_batch_size=mb, grad_accum=8)
    rows["DataLoader 8 x 8, mmap_release_every=64 (flat RSS)"] = (
        steps * 64 * seq / best_of(lambda: [unmapping.next_step() for _ in range(steps)], a.repeats)
    )
    ids = [np.random.default_rng(k).integers(0, ds.num_samples, 64) for k in range(steps)]
    rows["TokenDataset.read alone, 64 samples/call"] = (
        steps * 64 * seq / best_of(lambda: [ds.read(i) for i in ids], a.repeats)
    )
    whole = DataLoader(
        TokenDataset(folder, seq, packing="whole_documents"), micro_batch_size=mb, grad_accum=8
    )
    rows["DataLoader whole_documents, 8 x 8"] = (
        steps * 64 * seq / best_of(lambda: [whole.next_step() for _ in range(steps)], a.repeats)
    )
    masked = DataLoader(ds, micro_batch_size=mb, grad_accum=1, seed=1, document_mask=True)
    few = max(steps // 10, 5)
    rows["DataLoader concat + document_mask, 8 x 1"] = (
        few * mb * seq / best_of(lambda: [masked.next_step() for _ in range(few)], a.repeats)
    )
    train = tiny_train_step(512, 8)
    rows["training: tiny Llama (conf/model/tiny), 8 x 512"] = (
        3 * 8 * 512 / best_of(lambda: [train() for _ in range(3)], 2)
    )
    wait_share, with_prefetch = prefetch_wait(folder, 512, 8, 20)
    rows["training + DataLoader(prefetch=2), 8 x 512"] = with_prefetch
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    best = rows[f"DataLoader.next_step, {mb} x 8 samples/step"]
    train_rate = rows["training: tiny Llama (conf/model/tiny), 8 x 512"]
    print(
        f"\ndata throughput, 1 process, warm page cache, {index_size(folder):.0f} MB of shards, "
        f"seq_len {seq}, {steps} steps, best of {a.repeats}"
    )
    print(f"{'path':52s} {'tokens/s':>14s} {'GB/s (uint32)':>14s}")
    for name, rate in rows.items():
        print(f"{name:52s} {rate:14,.0f} {rate * 4 / 1e9:14.3f}")
    for name, r in ratios.items():
        print(f"loader / raw memmap ({name}) = {r:.3f} (target >= 0.9)")
    print(f"loader (8 x 8) / tiny-model training consumption = {best / train_rate:.0f}x")
    print(f"time waiting for data with prefetch=2 while training: {100 * wait_share:.2f}% of step time")
    print(f"peak RSS of this process {peak_mb:.0f} MB")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}",
        "dataset_mb": index_size(folder),
        "seq_len": seq,
        "micro_batch": mb,
        "steps": steps,
        "tokens_per_s": rows,
        "ratio_loader_vs_raw_memmap": ratios,
        "loader_vs_training": best / train_rate,
        "prefetch_wait_share": wait_share,
        "peak_rss_mb": peak_mb,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


def index_size(folder: Path) -> float:
    return sum(s.bytes for s in DatasetIndex.load(folder).shards) / 1e6


if __name__ == "__main__":
    main()
