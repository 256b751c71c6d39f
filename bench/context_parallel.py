"""Context parallelism at a long sequence on CPU: activation memory per rank of cp2 vs cp1.

    .venv/bin/python bench/context_parallel.py [--seq 8192] [--dim 64] [--layers 4] [--steps 2]

A tiny-width decoder (4 heads / 2 KV heads) trains on one 8k-token sequence per step through the
native engine (`build_engine`, the trainer's path): once on 1 rank (cp1), once on 2 gloo ranks
(parallel.cp=2, each rank holding 4k tokens: chunks i and 3-i). Per rank and step it measures the
peak of the tensor storages allocated inside the step (`llmtrain.plan.measure.PeakTensorMemory`, the
CPU analogue of torch.cuda.max_memory_allocated, minus what lived before the step: weights, AdamW
state) — activations, gradients, the loss transients and the K/V gathered over the cp group — next to
the planner's `dynamic` estimate of the same (llmtrain/plan/memory.py), and the median step time. The
losses of cp1 and cp2 must agree (same step, split). Prints a markdown table, writes
bench/results/context_parallel.json.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import bench_model_overrides, print_table, write_results  # noqa: E402
from llmtrain.data.loader import Batch  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402


def _measure(rank: int, world: int, cfg, a: argparse.Namespace) -> dict:
    """Peak bytes allocated inside each step on this rank, the step times and the last loss."""
    from llmtrain.parallel.build import build_engine
    from llmtrain.parallel.layout import build_dims
    from llmtrain.plan.measure import PeakTensorMemory

    torch.set_num_threads(1)
    cfg.parallel.cp = world
    dims = build_dims(cfg, world)
    engine = build_engine(cfg, dims, dims.build_mesh("cpu") if world > 1 else None, torch.device("cpu"))
    peaks, walls, loss = [], [], float("nan")
    for step in range(1 + a.steps):
        g = torch.Generator().manual_seed(step)  # the same whole sample on every cp rank
        toks = torch.randint(0, a.vocab, (1, a.seq + 1), generator=g)
        batch = [Batch(toks[:, :-1].contiguous(), toks[:, 1:].contiguous())]
        t0 = time.perf_counter()
        with PeakTensorMemory() as mem:
            loss = engine.train_step(batch, 1e-3).loss
        walls.append(time.perf_counter() - t0)
        peaks.append(mem.peak)
    return {"peak": max(peaks[1:]), "wall": statistics.median(walls[1:]), "loss": loss}


def planned_dynamic(cfg, cp: int, seq: int) -> float:
    """The planner's peak of activations + loss + gradients in a step (MemoryEstimate.dynamic)."""
    from llmtrain.models import model_args
    from llmtrain.plan.memory import Layout, estimate_memory

    return estimate_memory(model_args(cfg.model), seq, Layout(cp=cp), precision="fp32").dynamic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    from llmtrain.testing import compose_config

    cfg = compose_config(
        [
            *bench_model_overrides(a.dim, a.layers, a.seq, a.vocab),
            "trainer.global_batch_size=1",
            "trainer.micro_batch_size=1",
            "trainer.device=cpu",
            "parallel.dp_replicate=1",
            "run.root=/tmp/llmtrain-bench-cp",
        ]
    )
    rows = []
    for cp in (1, 2):
        ranks = run_distributed(_measure, world_size=cp, args=(cfg, a), timeout=1200)
        peak = max(r["peak"] for r in ranks)
        plan = planned_dynamic(cfg, cp, a.seq)
        rows.append(
            {
                "layout": f"cp{cp}",
                "ranks": cp,
                "tokens_per_rank": a.seq // cp,
                "step_peak_mib": peak / 2**20,
                "planner_mib": plan / 2**20,
                "measured_vs_planner": peak / plan,
                "step_s": max(r["wall"] for r in ranks),
                "loss": ranks[0]["loss"],
            }
        )
    for r in rows:
        r["vs_cp1"] = r["step_peak_mib"] / rows[0]["step_peak_mib"]
    cols = ["layout", "ranks", "tokens_per_rank", "step_peak_mib", "vs_cp1", "planner_mib"]
    table = print_table(rows, [*cols, "measured_vs_planner", "step_s", "loss"])
    write_results("context_parallel", {"args": vars(a), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
