"""Pipeline schedules side by side at pp2 or pp4 on CPU: step time and idle share, next to the planner's bubble.

    .venv/bin/python bench/pipeline.py [--pp 2] [--dim 128] [--layers 8] [--seq 64] [--microbatches 8] [--steps 4]

One spawned group of `--pp` gloo ranks (1 thread each) runs gpipe, 1f1b, interleaved_1f1b,
interleaved_zb, zbv and dualpipev in turn through the native engine (`build_engine`, the trainer's
path) on the same seeded batches: `--microbatches` pipeline micro-batches of one sequence per step,
1 warm-up step, then `--steps` timed steps. step_s is the median wall time of a step (slowest
rank); idle is 1 - process CPU time / wall time, averaged over the ranks (a rank blocked in a
gloo receive uses no CPU, so this is the measured bubble plus the send/receive wait; the optimizer
step and the loss/norm all-reduces are in both). The loss after the last step must agree across
schedules (they compute the same step). Prints a markdown table, writes bench/results/pipeline.json
(pipeline_pp4.json for --pp 4). On a machine with fewer cores than ranks the ranks share cores,
which inflates idle (a runnable rank waiting for a core is idle by this measure).
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import bench_model_overrides, print_table, write_results  # noqa: E402
from llmtrain.data.loader import Batch  # noqa: E402
from llmtrain.plan.pipeline import bubble_fraction  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

# schedule -> model chunks per rank
SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "interleaved_zb": 2, "zbv": 2, "dualpipev": 2}


def batches(step: int, a: argparse.Namespace) -> list[Batch]:
    """One sequence per micro-batch, seeded by the step (the same batches for every schedule)."""
    g = torch.Generator().manual_seed(step)
    toks = torch.randint(0, a.vocab, (a.microbatches, a.seq + 1), generator=g)
    return [Batch(toks[i : i + 1, :-1].clone(), toks[i : i + 1, 1:].clone()) for i in range(a.microbatches)]


def _schedule(rank: int, world: int, cfg, name: str, a: argparse.Namespace) -> dict:
    """Median wall and CPU seconds of a step of one schedule on this rank, and the last loss."""
    from llmtrain.parallel.build import build_engine
    from llmtrain.parallel.dims import ParallelDims

    cfg = copy.deepcopy(cfg)
    cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages = name, SCHEDULES[name]
    dims = ParallelDims(1, 1, 1, a.pp, world)
    engine = build_engine(cfg, dims, dims.build_mesh("cpu"), torch.device("cpu"))
    walls, cpus, loss = [], [], float("nan")
    for step in range(1 + a.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        loss = engine.train_step(batches(step, a), 1e-3).loss
        if step >= 1:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "loss": loss}


def _all(rank: int, world: int, cfg, a: argparse.Namespace) -> dict[str, dict]:
    torch.set_num_threads(1)
    return {name: _schedule(rank, world, cfg, name, a) for name in SCHEDULES}


def rows_of(ranks: list[dict[str, dict]], a: argparse.Namespace) -> list[dict]:
    """One table row per schedule from both ranks' timings."""
    rows = []
    for name, v in SCHEDULES.items():
        per = [r[name] for r in ranks]
        wall = max(p["wall"] for p in per)
        rows.append(
            {
                "schedule": name,
                "step_s": wall,
                "idle": statistics.mean(1 - p["cpu"] / p["wall"] for p in per),
                "planner_bubble": bubble_fraction(name, a.pp, a.microbatches, v),
                "final_loss": per[0]["loss"],
            }
        )
    base = rows[1]["step_s"]  # 1f1b
    for r in rows:
        r["vs_1f1b"] = r["step_s"] / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, default=2, choices=(2, 4))
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    from llmtrain.testing import compose_config

    cfg = compose_config(
        [
            *bench_model_overrides(a.dim, a.layers, a.seq, a.vocab),
            f"trainer.global_batch_size={a.microbatches}",
            "trainer.micro_batch_size=1",
            f"trainer.val_batches={a.microbatches}",
            f"parallel.pp={a.pp}",
            "run.root=/tmp/llmtrain-bench-pipeline",
        ]
    )
    ranks = run_distributed(_all, world_size=a.pp, args=(cfg, a), timeout=1800)
    rows = rows_of(ranks, a)
    cols = ["schedule", "step_s", "vs_1f1b", "idle", "planner_bubble", "final_loss"]
    table = print_table(rows, cols)
    name = "pipeline" if a.pp == 2 else f"pipeline_pp{a.pp}"
    write_results(name, {"args": vars(a), "world_size": a.pp, "pp": a.pp, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
