"""Will this config fit, how long will it take, and which layouts fit?

    python tools/plan.py model=8b parallel=zero3 data.seq_len=8192 trainer.global_batch_size=256 \
        --gpus 8 --nodes 2 --gpu-mem 80 [--gpu "NVIDIA H100 80GB HBM3" | --peak-tflops 989] [--tf32] \
        [--mfu 0.4] [--intra-gbps 360 --inter-gbps 40]

Arguments with `=` are Hydra overrides of the training config (same as `llmtrain ...`); the
options describe the cluster. Prints the estimate for the configured layout and a table of
layouts that fit, fastest first. The peak is the one of the precision that runs (bf16 under
trainer.precision=bf16 or parallel.param_dtype=bf16, else fp32, or tf32 with --tf32). A batch that
does not split over the layout is replaced by the nearest one that does (printed as overrides).
Memory model and its measured error: docs/performance.md.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.models import model_args
from llmtrain.plan.batch import fit_config_batch
from llmtrain.plan.fit import Cluster, Plan, describe_model, layout_from_config, plan_layout, suggest_layouts
from llmtrain.plan.memory import GIB
from llmtrain.train.flops import compute_precision, lookup_peak_tflops

BF16_WEIGHTS_NOTE = (
    "note: trainer.precision=bf16 is autocast by design: weights, gradients and AdamW state stay fp32 "
    "(16 bytes per parameter); matmuls run in bf16"
)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB")
    ap.add_argument("--gpu", default="NVIDIA H100 80GB HBM3", help="device name for the peak-FLOPs table")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense peak per GPU in the run's precision (overrides --gpu)",
    )
    ap.add_argument(
        "--tf32",
        action="store_true",
        help="fp32 matmuls run as TF32 (torch.backends.cuda.matmul.allow_tf32); the trainer leaves it off",
    )
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed MFU before recompute and pipeline bubble")
    ap.add_argument("--headroom", type=float, default=0.1, help="share of GPU memory kept free")
    ap.add_argument(
        "--intra-gbps", type=float, default=360.0, help="collective bus bandwidth inside a node, GB/s"
    )
    ap.add_argument(
        "--inter-gbps", type=float, default=40.0, help="collective bus bandwidth per GPU across nodes, GB/s"
    )
    ap.add_argument("--top", type=int, default=8, help="layouts to suggest")
    ap.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    ap.add_argument(
        "--validate-cpu",
        action="store_true",
        help="measure peak tensor memory of small CPU runs and compare with the estimate",
    )
    opts, rest = ap.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a]
    if bad:
        ap.error(f"unrecognized arguments {bad}: config overrides look like key=value")
    return opts, rest


def row(p: Plan) -> str:
    lo, m = p.layout, p.memory
    return (
        f"{lo.dp_replicate:>4}x{lo.dp_shard:<4} {lo.tp:>3} {lo.pp:>3} {lo.zero_stage:>5} {lo.activation_checkpoint:>9} "
        f"{lo.micro_batch_size:>4} {p.grad_accum:>5} {m.total / GIB:>8.1f} {p.step_time_s:>8.2f} "
        f"{p.comm_exposed_s:>7.2f} {p.tokens_per_s:>11,.0f} {100 * p.mfu:>5.1f}%"
    )


HEADER = (
    f"{'dp rxs':>9} {'tp':>3} {'pp':>3} {'zero':>5} {'ckpt':>9} {'mbs':>4} {'accum':>5} {'GiB/GPU':>8} "
    f"{'step s':>8} {'comm s':>7} {'tokens/s':>11} {'MFU':>6}"
)


def validate_cpu(json_path: Path | None) -> int:
    """Print estimate vs measured peak memory for the built-in validation cases."""
    import torch

    from llmtrain.plan.measure import validate_estimates

    torch.set_num_threads(1)
    rows = validate_estimates()
    print(
        f"{'model':<26} {'seq':>4} {'mbs':>3} {'acc':>3} {'prec':>5} {'ckpt':>9} {'measured MiB':>12} "
        f"{'estimate MiB':>12} {'error':>7}"
    )
    for r in rows:
        print(
            f"{r['model']:<26} {r['seq']:>4} {r['mbs']:>3} {r['accum']:>3} {r['precision']:>5} {r['ckpt']:>9} "
            f"{r['measured_mib']:>12.2f} {r['estimate_mib']:>12.2f} {r['error_pct']:>+6.1f}%"
        )
    worst = max(abs(r["error_pct"]) for r in rows)
    print(f"worst absolute error {worst:.1f}%")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))
    return 0


def build_cluster(opts: argparse.Namespace, peak: float) -> Cluster:
    return Cluster(
        nodes=opts.nodes,
        gpus_per_node=opts.gpus,
        gpu_mem_gib=opts.gpu_mem,
        peak_tflops=peak,
        mfu=opts.mfu,
        headroom=opts.headroom,
        intra_node_gbps=opts.intra_gbps,
        inter_node_gbps=opts.inter_gbps,
    )


def print_header(cfg: Any, opts: argparse.Namespace, counts: dict, peak: float, compute: str) -> None:
    seq, gbs = cfg.data.seq_len, cfg.trainer.global_batch_size
    print(
        f"model {cfg.model.name}: {counts['params'] / 1e9:.3f} B parameters "
        f"({counts['params_non_embedding'] / 1e9:.3f} B without the input embedding), seq {seq}, "
        f"global batch {gbs} x {seq} = {gbs * seq:,} tokens/step, precision {cfg.trainer.precision}"
    )
    print(
        f"cluster: {opts.nodes} node(s) x {opts.gpus} GPUs, {opts.gpu_mem:g} GiB each "
        f"({100 * (1 - opts.headroom):.0f}% usable), peak {peak:g} {compute} TFLOP/s, "
        f"assumed MFU {opts.mfu:.0%}, links {opts.intra_gbps:g} GB/s in a node, "
        f"{opts.inter_gbps:g} GB/s per GPU across nodes"
    )
    if cfg.trainer.precision == "bf16":
        print(BF16_WEIGHTS_NOTE)


def report_configured(plan: Plan, cluster: Cluster, max_steps: int) -> dict:
    """Print the configured layout's estimate; return it for the JSON report."""
    m = plan.memory
    print(f"\nconfigured layout {plan.layout.describe()} (accumulation {plan.grad_accum}):")
    for k, v in m.as_gib().items():
        print(f"  {k:<12} {v:10.2f} GiB")
    print(f"  -> {'FITS' if plan.fits else 'DOES NOT FIT'} in {cluster.usable_bytes / GIB:.1f} GiB usable")
    print(f"  FLOPs/step: model {plan.model_flops_per_step:.3e}, hardware {plan.hw_flops_per_step:.3e}")
    traffic = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in plan.comm_bytes.items()) or "none"
    print(
        f"  communication per GPU per step: {traffic}; {plan.comm_s:.2f} s at the link rates, "
        f"{plan.comm_exposed_s:.2f} s not hidden by compute"
    )
    print(
        f"  step {plan.step_time_s:.2f} s, {plan.tokens_per_s:,.0f} tokens/s, MFU {plan.mfu:.1%}; "
        f"{max_steps} steps = {max_steps * plan.step_time_s / 3600:.2f} h"
    )
    return {
        "layout": plan.layout.describe(),
        "fits": plan.fits,
        "memory_gib": m.as_gib(),
        "step_time_s": plan.step_time_s,
        "mfu": plan.mfu,
        "comm_bytes": plan.comm_bytes,
        "comm_s": plan.comm_s,
        "comm_exposed_s": plan.comm_exposed_s,
    }


def report_suggestions(fits: list[Plan]) -> list[dict]:
    print(f"\nlayouts that fit ({len(fits)} shown, fastest first):")
    print(HEADER)
    for p in fits:
        print(row(p))
    if fits:
        print(f"\nbest: {fits[0].overrides()}")
    else:
        print("none: add GPUs, lower data.seq_len or trainer.global_batch_size, or use more memory per GPU")
    return [
        {
            "overrides": p.overrides(),
            "gib": p.memory.total / GIB,
            "step_time_s": p.step_time_s,
            "comm_exposed_s": p.comm_exposed_s,
            "mfu": p.mfu,
        }
        for p in fits
    ]


def main(argv: list[str] | None = None) -> int:
    opts, overrides = parse(sys.argv[1:] if argv is None else argv)
    if opts.validate_cpu:
        return validate_cpu(opts.json)
    from llmtrain.testing import compose_config

    cfg = compose_config(overrides)
    fp8 = cfg.parallel.fp8.recipe != "none"  # FP8 matmuls: the FP8 datasheet peak
    compute = compute_precision(cfg.trainer.precision, cfg.parallel.param_dtype, opts.tf32, fp8)
    peak = opts.peak_tflops or (lookup_peak_tflops(opts.gpu, compute) or (None, None))[1]
    if peak is None:
        raise SystemExit(f"--gpu {opts.gpu!r} is not in the peak table; pass --peak-tflops")
    cluster = build_cluster(opts, peak)
    batch_notes: list[str] = []
    with contextlib.suppress(ValueError):  # degrees that cannot fill the world: reported below
        cfg, batch_notes = fit_config_batch(cfg, cluster.world)
    args, seq, gbs = model_args(cfg.model), cfg.data.seq_len, cfg.trainer.global_batch_size
    prec = cfg.trainer.precision
    counts = describe_model(args)
    print_header(cfg, opts, counts, peak, compute)
    for note in batch_notes:
        print(f"batch: {note}")
    report: dict = {
        "model": cfg.model.name,
        "params": counts["params"],
        "cluster": vars(opts) | {"json": None},
        "peak_tflops": peak,
        "compute_precision": compute,
        "batch_notes": batch_notes,
        "batch": {
            k: getattr(cfg.trainer, k) for k in ("global_batch_size", "micro_batch_size", "val_batches")
        },
    }
    try:
        plan = plan_layout(args, seq, gbs, layout_from_config(cfg, cluster.world), cluster, prec)
    except ValueError as e:
        print(f"\nconfigured layout: not valid on {cluster.world} GPUs: {e}")
        plan = None
    if plan is not None:
        report["configured"] = report_configured(plan, cluster, cfg.trainer.max_steps)
    fits = suggest_layouts(args, seq, gbs, cluster, prec, top=opts.top)
    report["suggestions"] = report_suggestions(fits)
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if (plan is None or plan.fits or fits) else 1


if __name__ == "__main__":
    raise SystemExit(main())
