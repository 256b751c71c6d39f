"""Checkpoint I/O: save/load throughput against plain sequential file I/O, and async-save blocking.

    .venv/bin/python bench/checkpoint_io.py [--model 125m] [--out bench/results/checkpoint_io.json]

One run, one process, CPU. For a model preset (125m: 134M parameters, fp32 weights + AdamW state =
1.6 GB) it measures, on the disk that holds --dir:
  * sync save (DCP shards + RNG + state, every file fsynced, atomic rename, manifest) in GB/s, against
    writing the same number of bytes to one file sequentially with one fsync;
  * load (manifest + safe metadata verification + DCP read into the model and optimizer) in GB/s,
    against reading that file back; both start cold (pages dropped with posix_fadvise DONTNEED);
  * async save: how long the training loop is blocked (staging to /dev/shm) vs the whole sync save,
    the time until the background commit is complete, and one training step's time with and without a
    background commit running (on 2 shared cores the writer competes with the step).
Prints a table and writes JSON.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmtrain.checkpoint import CheckpointManager  # noqa: E402
from llmtrain.data.loader import Batch  # noqa: E402
from llmtrain.parallel import ParallelDims  # noqa: E402
from llmtrain.parallel.build import build_engine  # noqa: E402
from llmtrain.testing import compose_config  # noqa: E402


def drop_cache(root: Path) -> None:
    """Evict the files' pages so the next read comes from the disk (works unprivileged, after fsync)."""
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_write(path: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    buf = os.urandom(1 << 20) * (chunk >> 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(buf[: min(chunk, left)])
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def plain_read(path: Path, chunk: int = 64 << 20) -> float:
    drop_cache(path)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def train_step(engine, vocab: int) -> float:
    toks = torch.randint(0, vocab, (1, 33))
    t0 = time.perf_counter()
    engine.train_step([Batch(toks[:, :-1], toks[:, 1:].clone())], 1e-4)
    return time.perf_counter() - t0


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="125m")
    ap.add_argument("--dir", default=str(ROOT / "runs" / "bench_checkpoint_io"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint_io.json"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        cfg = compose_config(
            [f"model={args.model}", "tracking=none", f"run.root={tmp}", "trainer.num_threads=2"]
        )
        engine = build_engine(cfg, ParallelDims(1, 1, 1, 1, 1), None, torch.device("cpu"))
        n_params = sum(p.numel() for p in engine.model.parameters())
        vocab = cfg.model.vocab_size
        train_step(engine, vocab)  # creates the AdamW moments
        step_alone = min(train_step(engine, vocab) for _ in range(2))
        state = {"tokens_seen": 0, "config": {}}

        sync = CheckpointManager(tmp / "sync", keep_last=1)
        t0 = time.perf_counter()
        res = sync.save(1, engine, state, {})
        t_save = time.perf_counter() - t0
        nbytes = tree_bytes(res.path)
        t_plain_w = plain_write(tmp / "plain.bin", nbytes)
        drop_cache(res.path)
        t0 = time.perf_counter()
        sync.load(res.path, engine)
        t_load = time.perf_counter() - t0
        t_plain_r = plain_read(tmp / "plain.bin")
        (tmp / "plain.bin").unlink()

        asy = CheckpointManager(tmp / "async", keep_last=1, async_save=True)
        t0 = time.perf_counter()
        ares = asy.save(1, engine, state, {})
        step_during = train_step(engine, vocab)
        ares.done.result()
        t_async_total = time.perf_counter() - t0

    gb = nbytes / 1e9
    rows = {
        "model": args.model,
        "params": n_params,
        "checkpoint_gb": round(gb, 3),
        "save_s": t_save,
        "save_gbps": gb / t_save,
        "plain_write_gbps": gb / t_plain_w,
        "save_vs_plain": t_plain_w / t_save,
        "load_s": t_load,
        "load_gbps": gb / t_load,
        "plain_read_gbps": gb / t_plain_r,
        "load_vs_plain": t_plain_r / t_load,
        "async_blocked_s": ares.blocked_s,
        "async_total_s": t_async_total,
        "sync_blocked_s": t_save,
        "blocked_fraction": ares.blocked_s / t_save,
        "step_s_alone": step_alone,
        "step_s_during_background_write": step_during,
        "machine": "2-core CPU container (shared)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"checkpoint I/O, model {args.model} ({n_params / 1e6:.0f}M params, checkpoint {gb:.2f} GB)")
    print(f"{'':24}{'llmtrain':>12}{'plain file':>12}{'ratio':>8}")
    print(
        f"{'save GB/s':24}{rows['save_gbps']:>12.3f}{rows['plain_write_gbps']:>12.3f}{rows['save_vs_plain']:>8.2f}"
    )
    print(
        f"{'load GB/s (cold)':24}{rows['load_gbps']:>12.3f}{rows['plain_read_gbps']:>12.3f}{rows['load_vs_plain']:>8.2f}"
    )
    print(
        f"loop blocked: sync save {t_save:.2f} s, async save {ares.blocked_s:.2f} s "
        f"({100 * rows['blocked_fraction']:.0f}%); async complete after {t_async_total:.2f} s"
    )
    print(f"train step {step_alone:.2f} s alone, {step_during:.2f} s during the background write")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
