"""Mixture of experts on one device: grouped GEMM vs per-expert loop, the dispatch share of the MoE
layer, and training tokens/s of an MoE model vs a dense model of the same active size.

    python bench/moe.py [--reps 9 --batch 8 --seq 256 --steps 4]   # table on stdout, JSON in bench/results/

1. One MoE layer of moe_tiny's shape (dim 128, 8 experts of width 96, top-2, no shared expert),
   forward + backward on batch x seq tokens, `moe_gemm=grouped` vs `loop`. Process CPU time, median
   of --reps (on a shared machine CPU time is what the work cost).
2. Dispatch + combine share = (layer - router - experts on pre-sorted tokens) / layer, the same
   forward + backward, grouped GEMM.
3. Training steps (train_step: forward, backward, AdamW) of moe_tiny with every layer MoE against
   the dense decoder whose SwiGLU is as wide as the active experts (top_k + shared) x 96 = 288: the
   same active parameters apart from the router (the MFU numerator of both is within 1%).
4. (--ep, 2 spawned gloo ranks) the same moe_tiny training step under DDP (dp2, every rank all 8
   experts) and under ep2 (4 experts per rank, all-to-all dispatch): wall time of a step (median,
   rank 0), the share of it spent inside the token all-to-alls, and the rows' bytes each rank sent to
   the other per step next to the planner's dispatch volume (llmtrain/plan/experts.py).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import print_table, timed_cpu, write_results

CPU = torch.device("cpu")


def median_cpu(fn, reps: int) -> float:
    fn()  # warm-up
    return statistics.median(timed_cpu(fn, CPU)[1] for _ in range(reps))


def layer_times(batch: int, seq: int, reps: int) -> dict[str, float]:
    """CPU seconds of one MoE layer's forward + backward per GEMM mode, and its parts."""
    from llmtrain.models.moe import MoE, MoEArgs

    torch.manual_seed(0)
    out: dict[str, float] = {}
    x = torch.randn(batch, seq, 128, requires_grad=True)
    for gemm in ("grouped", "loop"):
        layer = MoE(MoEArgs(dim=128, num_experts=8, top_k=2, expert_dim=96, gemm=gemm))
        for p in layer.parameters():
            p.data.normal_(0, 0.02)
        out[f"layer_{gemm}"] = median_cpu(lambda m=layer: m(x).square().sum().backward(), reps)
    flat = x.detach().reshape(-1, 128)
    _, idx, _, _ = layer.router(flat)
    order = idx.flatten().argsort(stable=True)
    routed = flat.index_select(0, order // 2).requires_grad_()
    counts = torch.bincount(idx.flatten(), minlength=8)
    layer.experts.gemm = "grouped"
    out["experts"] = median_cpu(lambda: layer.experts(routed, counts).square().sum().backward(), reps)
    out["router"] = median_cpu(lambda: layer.router(x.reshape(-1, 128))[0].sum().backward(), reps)
    return out


def train_tokens_per_s(moe: bool, batch: int, seq: int, steps: int) -> tuple[float, int]:
    """Training tokens per CPU second and active parameters of moe_tiny (all layers MoE) or its
    dense counterpart of equal active width."""
    from llmtrain.data.loader import Batch
    from llmtrain.models.build import build_model, count_active_params
    from llmtrain.optim import build_optimizer
    from llmtrain.parallel.step import StepContext, train_step
    from llmtrain.testing import compose_config

    shape = ["model.moe_first_k_dense=0"] if moe else ["model.moe_num_experts=0", "model.ffn_dim=288"]
    cfg = compose_config(["model=moe_tiny", "tracking=none", f"data.seq_len={seq}", *shape])
    model = build_model(cfg.model, CPU)
    model.init_weights(0)
    opt = build_optimizer(model, cfg.optim)
    ctx = StepContext(dp_size=1, dp_group=None, grad_clip=1.0)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1))
    batches = [Batch(tokens[:, :-1], tokens[:, 1:])]
    train_step(model, opt, batches, ctx)  # warm-up (optimizer state)
    cpu = [timed_cpu(lambda: train_step(model, opt, batches, ctx), CPU)[1] for _ in range(steps)]
    return batch * seq / statistics.median(cpu), count_active_params(model)


def _ep_rank(rank: int, world: int, batch: int, seq: int, steps: int) -> dict[str, dict]:
    """One rank of item 4: step wall time per layout, a2a wall time and the bytes sent off-rank."""
    import llmtrain.parallel.expert_parallel as ep_mod
    from llmtrain.data.loader import Batch
    from llmtrain.parallel.build import build_engine
    from llmtrain.parallel.layout import build_dims
    from llmtrain.testing import compose_config

    torch.set_num_threads(1)
    exchange, seen = ep_mod._exchange, {"s": 0.0, "bytes": 0.0}

    def counted(x, out_splits, in_splits, group):  # rows this rank sends to the others, and the time
        t0 = time.perf_counter()
        out = exchange(x, out_splits, in_splits, group)
        seen["s"] += time.perf_counter() - t0
        seen["bytes"] += (sum(in_splits) - in_splits[rank]) * x[:1].numel() * x.element_size()
        return out

    ep_mod._exchange = counted
    out = {}
    for name, extra in (("dp2 (DDP)", []), ("ep2", ["parallel.ep=2"])):
        over = ["model=moe_tiny", "model.moe_first_k_dense=0", f"data.seq_len={seq}", "trainer.device=cpu"]
        over += [
            f"trainer.micro_batch_size={batch}",
            f"trainer.global_batch_size={2 * batch}",
            "tracking=none",
        ]
        cfg = compose_config([*over, "parallel=ddp", *extra])
        dims = build_dims(cfg, world)
        engine = build_engine(cfg, dims, dims.build_mesh("cpu"), CPU)
        g = torch.Generator().manual_seed(rank)
        toks = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=g)
        batches = [Batch(toks[:, :-1].contiguous(), toks[:, 1:].contiguous())]
        engine.train_step(batches, 1e-3)  # warm-up (optimizer state)
        walls = []
        seen.update(s=0.0, bytes=0.0)
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.train_step(batches, 1e-3)
            walls.append(time.perf_counter() - t0)
        out[name] = {
            "step_s": statistics.median(walls),
            "a2a_s": seen["s"] / steps,
            "bytes": seen["bytes"] / steps,
        }
    return out


def ep_rows(batch: int, seq: int, steps: int) -> list[dict]:
    """Item 4 of the module docstring: rank 0's figures and the planner's dispatch bytes."""
    from llmtrain.models import model_args
    from llmtrain.plan.experts import dispatch_bytes
    from llmtrain.testing import compose_config
    from tests.distributed import run_distributed

    got = run_distributed(_ep_rank, 2, args=(batch, seq, steps), timeout=600)[0]
    cfg = compose_config(["model=moe_tiny", "model.moe_first_k_dense=0", "tracking=none"])
    act = 2.0 if cfg.trainer.precision == "bf16" else 4.0  # the experts' output dtype (autocast)
    planned = dispatch_bytes(model_args(cfg.model), seq, batch, 1, 2, 4.0, act, False)
    rows = []
    for name, r in got.items():
        rows.append({"layout": name, "step_s": r["step_s"], "a2a_share": r["a2a_s"] / r["step_s"],
                     "a2a_MB_sent": r["bytes"] / 1e6, "planned_MB": planned / 1e6 if "ep" in name else 0.0})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--ep", action="store_true", help="also item 4: dp2 vs ep2 on 2 spawned ranks")
    opts = ap.parse_args()
    torch.set_num_threads(1)
    t = layer_times(opts.batch, opts.seq, opts.reps)
    dispatch = t["layer_grouped"] - t["experts"] - t["router"]
    layer_rows = [
        {"what": "MoE layer fwd+bwd, grouped GEMM", "cpu_ms": 1e3 * t["layer_grouped"]},
        {"what": "MoE layer fwd+bwd, per-expert loop", "cpu_ms": 1e3 * t["layer_loop"]},
        {"what": "  of which experts (grouped)", "cpu_ms": 1e3 * t["experts"]},
        {"what": "  of which router", "cpu_ms": 1e3 * t["router"]},
        {"what": "  dispatch + combine (rest)", "cpu_ms": 1e3 * dispatch},
    ]
    print_table(layer_rows, ["what", "cpu_ms"])
    share = dispatch / t["layer_grouped"]
    print(f"grouped / loop: {t['layer_grouped'] / t['layer_loop']:.3f}; dispatch share {100 * share:.1f}%")
    train_rows = []
    for moe in (True, False):
        tps, active = train_tokens_per_s(moe, opts.batch, opts.seq, opts.steps)
        train_rows.append({"model": "moe (8 experts, top-2 + shared)" if moe else "dense, ffn 288",
                           "active_params": active, "tokens_per_cpu_s": tps})  # fmt: skip
    print_table(train_rows, ["model", "active_params", "tokens_per_cpu_s"])
    ratio = train_rows[0]["tokens_per_cpu_s"] / train_rows[1]["tokens_per_cpu_s"]
    print(f"moe / dense tokens per CPU second: {ratio:.3f}")
    ep = ep_rows(opts.batch, opts.seq, opts.steps) if opts.ep else []
    if ep:
        print_table(ep, ["layout", "step_s", "a2a_share", "a2a_MB_sent", "planned_MB"])
    write_results(
        "moe",
        {
            "config": vars(opts),
            "layer": layer_rows,
            "dispatch_share": share,
            "train": train_rows,
            "moe_over_dense": ratio,
            "ep": ep,
        },
    )


if __name__ == "__main__":
    main()
