"""Cost of the straggler probe (resilience.straggler_every) on 2 gloo ranks under DDP.

    .venv/bin/python bench/stragglers.py [--dim 128] [--layers 4] [--seq 128] [--steps 40] [--every 100]

One spawned group of 2 ranks (1 thread each) trains the native engine (`build_engine`, the trainer's
path) on seeded batches; steps alternate probed / not probed (`StragglerProbe.measure`, as the trainer
wraps a step) after 4 warm-up steps. Reported per rank, medians over the steps:
  - step_s: a step without the probe;
  - probe_s: the probe's own time on a probed step (hook registration, the aligning barrier, the
    one all-gather of 3 floats, hook removal), timed inside the probe;
  - ab_delta_s: median probed minus median unprobed step (noisy on a shared machine: the effect is
    smaller than the noise, so probe_s is the figure);
  - cost_pct: probe_s / (every * step_s) * 100, the share of step time at the cadence `--every`
    (the default resilience.straggler_every is 100).
Prints a markdown table, writes bench/results/stragglers.json.
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

WARMUP = 4


def batches(step: int, a: argparse.Namespace) -> list[Batch]:
    """Two micro-batches of 4 sequences, seeded by the step and the rank."""
    g = torch.Generator().manual_seed(step * 2 + torch.distributed.get_rank())
    toks = torch.randint(0, a.vocab, (8, a.seq + 1), generator=g)
    return [Batch(toks[i : i + 4, :-1].clone(), toks[i : i + 4, 1:].clone()) for i in (0, 4)]


def _rank(rank: int, world: int, cfg, a: argparse.Namespace) -> dict:
    from llmtrain.parallel.build import build_engine
    from llmtrain.parallel.dims import ParallelDims
    from llmtrain.resilience.stragglers import StragglerProbe

    torch.set_num_threads(1)
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world)
    engine = build_engine(cfg, dims, dims.build_mesh("cpu"), torch.device("cpu"))
    probe = StragglerProbe(1, 0.2, engine.modules, engine.optimizer)
    plain, probed, costs = [], [], []
    for step in range(WARMUP + 2 * a.steps):
        probe.every = 1 if step % 2 else 0
        t0 = time.perf_counter()
        with probe.measure(step):
            engine.train_step(batches(step, a), 1e-3)
        wall = time.perf_counter() - t0
        if step >= WARMUP:
            (probed if probe.every else plain).append(wall)
            if probe.every:
                costs.append(probe.cost_s)
    return {
        "step_s": statistics.median(plain),
        "probed_s": statistics.median(probed),
        "probe_s": statistics.median(costs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=100)
    a = ap.parse_args()
    from llmtrain.testing import compose_config

    cfg = compose_config(
        [
            *bench_model_overrides(a.dim, a.layers, a.seq, a.vocab),
            "trainer.global_batch_size=16",
            "trainer.micro_batch_size=4",
            "run.root=/tmp/llmtrain-bench-stragglers",
        ]
    )
    ranks = run_distributed(_rank, world_size=2, args=(cfg, a), timeout=1200)
    rows = []
    for r, m in enumerate(ranks):
        cost = m["probe_s"] / (a.every * m["step_s"]) * 100
        rows.append({"rank": r, **m, "ab_delta_s": m["probed_s"] - m["step_s"], "cost_pct": cost})
    cols = ["rank", "step_s", "probed_s", "ab_delta_s", "probe_s", "cost_pct"]
    table = print_table(rows, cols)
    write_results("stragglers", {"args": vars(a), "world_size": 2, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
