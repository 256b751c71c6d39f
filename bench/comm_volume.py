"""Bytes each rank sends through the process group in one training step, per layout, against the
analytical volume of that layout (native engine, gloo, 2 CPU ranks, fp32).

    .venv/bin/python bench/comm_volume.py            # table on stdout, JSON in bench/results/

Counting: the torch profiler records every gloo collective the process group runs (whoever calls it:
DDP's C++ reducer, FSDP2, DTensor redistributions, pipelining p2p) as `gloo:<op>` with its input
shapes and dtypes. Per-rank *sent* bytes follow the ring/bus model with group size n (2 here):
all_reduce of S bytes 2S(n-1)/n, all_gather of a local chunk s (n-1)s, reduce_scatter of an input S
S(n-1)/n, send S, broadcast S(n-1)/n (averaged over ranks). Step 1 (pipelining shape inference,
optimizer state allocation) is a warm-up; step 2 is measured.

Analytical volume: the planner's formulas (llmtrain/plan/comm.py, one source for both), with P =
parameter bytes, A = one micro-batch's activation b*s*dim*4 bytes, m = micro-batches per step, L =
layers, n = 2:
  dp (DDP)  one all-reduce of the gradients                     2P(n-1)/n
  zero1     one all-gather of parameters + one reduce-scatter    2P(n-1)/n
  zero2     one all-gather + one reduce-scatter per micro-batch   (1 + m) P(n-1)/n
  zero3     per micro-batch: all-gather fwd + bwd, reduce-scatter 3m P(n-1)/n
  tp (SP)   per micro-batch (8L + 4) all-gathers/reduce-scatters of A: fwd and bwd of 2 per block
            sub-layer pair, plus embedding and output projection   (8L + 4) m A (n-1)/n
  pp        each micro-batch's activation forward (stage 0) or its gradient back (stage 1): m A
  cp        per micro-batch and layer an all-gather of K and V (b*s*2*kv_heads*head_dim*4 bytes = K)
            and a reduce-scatter of their gradients, 2 L m K (n-1)/n, plus DDP's 2P(n-1)/n over dp x cp
Small extras (token count, loss, grad-norm scalars, loss-parallel (b*s) partials) are counted in
the measurement but not in the analytical volume, so ratios slightly above 1 are expected on this
tiny model; they vanish with size.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIM, LAYERS, SEQ, MICRO, GLOBAL, VOCAB = 64, 2, 32, 2, 8, 256
MODEL = [
    f"model.dim={DIM}",
    f"model.n_layers={LAYERS}",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    f"model.ffn_dim={2 * DIM}",
    f"model.vocab_size={VOCAB}",
    "model.max_seq_len=64",
    f"data.seq_len={SEQ}",
    f"trainer.micro_batch_size={MICRO}",
    f"trainer.global_batch_size={GLOBAL}",
    "trainer.device=cpu",
    "tracking=none",
    "optim.warmup_steps=0",
]
LAYOUTS = {
    "dp2 (DDP)": ["parallel=ddp"],
    "zero1 dp2": ["parallel=zero1"],
    "zero2 dp2": ["parallel=zero2"],
    "zero3 dp2": ["parallel=zero3"],
    "tp2 (SP)": ["parallel=tp2"],
    "pp2 1f1b": ["parallel=pp2"],
    "cp2": ["parallel=cp2"],
}


def sent_bytes(event: dict, n: int) -> tuple[str, float]:
    """(op, bytes this rank sends) for one `gloo:<op>` trace event under the ring model."""
    op = event["name"].split(":", 1)[1]
    args = event.get("args", {})
    sizes = [
        torch.tensor([], dtype=_dtype(t)).element_size() * _numel(d)
        for d, t in zip(args.get("Input Dims", []), args.get("Input type", []))
    ]
    total = float(sum(sizes))
    factor = {
        "all_reduce": 2 * (n - 1) / n,
        "allreduce": 2 * (n - 1) / n,
        "all_gather": n - 1,
        "_allgather_base": n - 1,
        "allgather_into_tensor_coalesced": n - 1,
        "reduce_scatter": (n - 1) / n,
        "_reduce_scatter_base": (n - 1) / n,
        "reduce_scatter_tensor_coalesced": (n - 1) / n,
        "send": 1.0,
        "recv": 0.0,
        "broadcast": (n - 1) / n,
        "barrier": 0.0,
    }
    if op not in factor:
        raise RuntimeError(f"unknown collective in trace: {event['name']} {args}")
    return op, total * factor[op]


def reduce_scatter_excess(trace: list[dict], n: int) -> float:
    """Bytes gloo sends beyond a real reduce-scatter: it has none and runs each `_reduce_scatter_base_`
    (FSDP2) and `reduce_scatter_tensor_coalesced_` (DTensor) as an all-reduce of the whole input S
    (2S(n-1)/n instead of S(n-1)/n). NCCL has a real reduce-scatter; subtracting this gives its volume.
    """
    excess = 0.0
    for e in trace:
        if e.get("name") in ("c10d::_reduce_scatter_base_", "c10d::reduce_scatter_tensor_coalesced_"):
            inputs = e["args"]["Input Dims"][1]
            tensors = inputs if inputs and isinstance(inputs[0], list) else [inputs]
            excess += sum(_numel(t) for t in tensors) * 4 * (n - 1) / n  # fp32 in this benchmark
    return excess


def _numel(dims: list) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out if dims else 0


def _dtype(name: str) -> torch.dtype:
    return {
        "float": torch.float32,
        "double": torch.float64,
        "c10::BFloat16": torch.bfloat16,
        "long int": torch.int64,
        "int": torch.int32,
        "unsigned char": torch.uint8,
        "bool": torch.bool,
        "c10::Half": torch.float16,
    }.get(name, torch.float32)


def analytical(cfg, world: int) -> float:
    """The planner's volume (llmtrain/plan/comm.py) for this layout: bytes the busiest rank sends."""
    from llmtrain.models import model_args
    from llmtrain.plan.comm import comm_volume
    from llmtrain.plan.fit import layout_from_config

    layout = layout_from_config(cfg, world)
    accum = GLOBAL // (MICRO * layout.dp)
    parts = comm_volume(model_args(cfg.model), SEQ, layout, accum, gpus_per_node=world, precision="fp32")
    return sum(p.bytes for p in parts.values())


def _batches(accum: int, g: torch.Generator) -> list:
    """Random token micro-batches (the volume does not depend on the values)."""
    from llmtrain.data.loader import Batch

    toks = torch.randint(0, VOCAB, (accum, MICRO, SEQ + 1), generator=g)
    return [Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in toks]


def _body(rank: int, world: int, trace_dir: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from llmtrain.models import build_model
    from llmtrain.models.build import count_params
    from llmtrain.parallel.build import build_engine
    from llmtrain.parallel.layout import build_dims
    from llmtrain.testing import compose_config

    out = {}
    for name, overrides in LAYOUTS.items():
        cfg = compose_config([*MODEL, *overrides])
        dims = build_dims(cfg, world)
        engine = build_engine(cfg, dims, dims.build_mesh("cpu"), torch.device("cpu"))
        g = torch.Generator().manual_seed(1000 + dims.coords(rank)["dp"])
        accum = GLOBAL // (MICRO * dims.dp)

        engine.train_step(_batches(accum, g), 1e-3)  # warm-up step
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            engine.train_step(_batches(accum, g), 1e-3)
        path = Path(trace_dir) / f"{rank}.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())["traceEvents"]
        events = [e for e in trace if e.get("name", "").startswith("gloo:")]
        if os.environ.get("DEBUG_CV"):
            print(
                name,
                sorted(
                    {
                        (e["name"], str(e.get("args", {}).get("Input Dims"))[:80])
                        for e in trace
                        if "c10d" in e.get("name", "") or "scatter" in e.get("name", "")
                    }
                ),
            )
        per_op: dict[str, float] = {}
        for e in events:
            op, b = sent_bytes(e, world)
            per_op[op] = per_op.get(op, 0.0) + b
        p_bytes = count_params(build_model(cfg.model)) * 4
        out[name] = {
            "sent": sum(per_op.values()),
            "per_op": per_op,
            "param_bytes": p_bytes,
            "rs_excess": reduce_scatter_excess(trace, world),
            "analytical": analytical(cfg, world),
        }
    return out


def main() -> None:
    from tests.distributed import run_distributed

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_distributed(_body, 2, args=(tmp,), timeout=600)
    rows = []
    print(
        f"{'layout':<11} {'gloo KB/rank':>12} {'NCCL-equiv KB':>13} {'analytical KB':>13} {'ratio':>6} "
        f"{'gloo ratio':>10}  by op (gloo KB, mean of ranks)"
    )
    for name in LAYOUTS:
        sent = sum(r[name]["sent"] for r in ranks) / len(ranks)
        equiv = sent - sum(r[name]["rs_excess"] for r in ranks) / len(ranks)
        ana = ranks[0][name]["analytical"]
        ops: dict[str, float] = {}
        for r in ranks:
            for op, b in r[name]["per_op"].items():
                ops[op] = ops.get(op, 0.0) + b / len(ranks)
        rows.append(
            {
                "layout": name,
                "gloo_bytes": sent,
                "nccl_equivalent_bytes": equiv,
                "analytical_bytes": ana,
                "ratio": equiv / ana,
                "gloo_ratio": sent / ana,
                "per_op_gloo_bytes": ops,
                "param_bytes": ranks[0][name]["param_bytes"],
            }
        )
        by_op = ", ".join(f"{k} {v / 1024:.1f}" for k, v in sorted(ops.items()) if v >= 0.05 * 1024)
        print(
            f"{name:<11} {sent / 1024:>12.1f} {equiv / 1024:>13.1f} {ana / 1024:>13.1f} {equiv / ana:>6.3f} "
            f"{sent / ana:>10.3f}  {by_op}"
        )
    out = ROOT / "bench" / "results" / "comm_volume.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": MODEL, "world_size": 2, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
