"""Engines side by side: the same model, data and 2-rank layout on every engine installed here.

    .venv/bin/python bench/engines.py [--dim 128] [--layers 4] [--seq 128] [--steps 8] [--repeats 2]

One spawned group of 2 gloo ranks (CPU) runs every case in turn: native DDP/TP2/PP2, DeepSpeed ZeRO
0/1/2/3, megatron-core DP2/TP2/PP2. Each case starts from the same init, takes 2 warm-up steps, then
`--steps` timed steps; tokens/s = global tokens of a step / median step time, best of `--repeats`
interleaved rounds. The loss after the last step is reported too: every engine trains the same model
on the same batches, so the losses must agree (a speed number for a wrong result is worthless).
On CPU, megatron-core runs only under the TEST-ONLY shim (tests/engines/megatron_cpu_shim.py; it is
CUDA-only otherwise), so its rows are marked "cpu shim". A layout an engine refuses and an engine
that is not installed are listed with the reason. Prints a markdown table, writes
bench/results/engines.json.
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
from tests.distributed import run_distributed  # noqa: E402

# (name, backend, dp, tp, pp, zero_stage)
CASES = [
    ("native ddp", "native", 2, 1, 1, 0),
    ("native tp2", "native", 1, 2, 1, 0),
    ("native pp2", "native", 1, 1, 2, 0),
    ("deepspeed zero0", "deepspeed", 2, 1, 1, 0),
    ("deepspeed zero1", "deepspeed", 2, 1, 1, 1),
    ("deepspeed zero2", "deepspeed", 2, 1, 1, 2),
    ("deepspeed zero3", "deepspeed", 2, 1, 1, 3),
    ("megatron dp2", "megatron", 2, 1, 1, 0),
    ("megatron tp2", "megatron", 1, 2, 1, 0),
    ("megatron pp2", "megatron", 1, 1, 2, 0),
]


def batches(step: int, dp: int, dp_rank: int, a: argparse.Namespace) -> list[Batch]:
    """This dp rank's micro-batches of a step (the DataLoader's split of one seeded global batch)."""
    g = torch.Generator().manual_seed(step)
    toks = torch.randint(0, a.vocab, (a.global_batch, a.seq + 1), generator=g)
    accum = a.global_batch // (a.micro * dp)
    rows = [(m * dp + dp_rank) * a.micro for m in range(accum)]
    return [Batch(toks[r : r + a.micro, :-1].clone(), toks[r : r + a.micro, 1:].clone()) for r in rows]


def _installed(backend: str) -> str | None:
    """None when usable, else why not."""
    import importlib.util

    pkg = {"deepspeed": "deepspeed", "megatron": "megatron.core"}.get(backend)
    if pkg is None:
        return None
    try:
        found = importlib.util.find_spec(pkg) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"not installed (pip install 'llmtrain[{backend}]')"


def _case(rank: int, world: int, cfg, case: tuple, a: argparse.Namespace) -> dict:
    from llmtrain.parallel.build import build_engine
    from llmtrain.parallel.dims import ParallelDims

    name, backend, dp, tp, pp, zero = case
    cfg = copy.deepcopy(cfg)
    cfg.parallel.backend, cfg.parallel.zero_stage, cfg.parallel.sequence_parallel = backend, zero, False
    device = torch.device("cpu")
    note = ""
    if backend == "megatron" and not torch.cuda.is_available():
        from tests.engines import megatron_cpu_shim

        megatron_cpu_shim.install()
        note = "cpu shim"
    dims = ParallelDims(1 if zero else dp, dp if zero else 1, tp, pp, world)
    mesh = dims.build_mesh(device.type) if backend == "native" else None
    try:
        engine = build_engine(cfg, dims, mesh, device)
    except Exception as e:  # an unavailable layout on this engine: report it, do not fake a number
        return {"engine": name, "note": f"unavailable: {str(e).splitlines()[0][:90]}"}
    dp_rank = dims.coords(rank)["dp"]
    times, loss = [], float("nan")
    for step in range(2 + a.steps):
        b = batches(step, dims.dp, dp_rank, a)
        t0 = time.perf_counter()
        loss = engine.train_step(b, 1e-3).loss
        if step >= 2:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "engine": name,
        "step_s": med,
        "tokens_per_s": a.global_batch * a.seq / med,
        "final_loss": loss,
        "note": note,
    }


def _all(rank: int, world: int, cfg, cases: list, a: argparse.Namespace) -> list[dict]:
    """Every case `--repeats` times, interleaved (so a burst of load on the shared machine does not hit
    one engine only); each case keeps its fastest repeat."""
    torch.set_num_threads(1)
    best: dict[str, dict] = {}
    for _ in range(a.repeats):
        for c in cases:
            r = _case(rank, world, cfg, c, a)
            if r.get("tokens_per_s", 0) >= best.get(r["engine"], {}).get("tokens_per_s", 0):
                best[r["engine"]] = r
    return [best[c[0]] for c in cases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    from llmtrain.testing import compose_config

    cfg = compose_config(
        [
            *bench_model_overrides(a.dim, a.layers, a.seq, a.vocab),
            f"trainer.global_batch_size={a.global_batch}",
            f"trainer.micro_batch_size={a.micro}",
            "run.root=/tmp/llmtrain-bench-engines",
        ]
    )
    runnable, rows = [], []
    for c in CASES:
        why = _installed(c[1])
        if why:
            rows.append({"engine": c[0], "note": why})
        else:
            runnable.append(c)
    results = run_distributed(_all, world_size=2, args=(cfg, runnable, a), timeout=1800)[0]
    rows = results + rows
    base = next(
        (r["tokens_per_s"] for r in rows if r["engine"] == "native ddp" and "tokens_per_s" in r), None
    )
    ref_loss = next(
        (r["final_loss"] for r in rows if r["engine"] == "native ddp" and "final_loss" in r), None
    )
    for r in rows:
        if base and "tokens_per_s" in r:
            r["vs_native_ddp"] = r["tokens_per_s"] / base
        if ref_loss and "final_loss" in r:
            r["loss_rel_diff"] = abs(r["final_loss"] - ref_loss) / ref_loss
    cols = ["engine", "tokens_per_s", "vs_native_ddp", "step_s", "final_loss", "loss_rel_diff", "note"]
    table = print_table(rows, cols)
    write_results("engines", {"args": vars(a), "world_size": 2, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
