"""GPU throughput and MFU: llmtrain vs a minimal reference loop vs Hugging Face transformers.

For the ~125M (conf/model/125m.yaml) and ~1B (conf/model/1b.yaml, Llama 3.2 1B shape) models at
seq 2048 in bf16 autocast with SDPA (flash) attention, each variant trains `--steps` timed steps
after `--warmup` steps on random tokens, on one GPU:
- llmtrain: the real engine (`build_engine`, the trainer's train_step path) with
  parallel.compile / parallel.activation_checkpoint set; the row says whether the engine actually
  applied them (compiled / checkpoint-wrapped modules found), so a missing feature cannot
  masquerade as a speed-up;
- reference: bench/common.py ReferenceLoop, the same model by hand with fused AdamW, optionally
  torch.compile per block and per-block checkpointing;
- llmtrain+fp8, llmtrain+compile+fp8: the same with parallel.fp8.recipe=rowwise (docs/fp8.md); their
  `mfu` divides by the bf16 peak like every row (so rows compare), `mfu_fp8` by the FP8 peak
  (the trainer's MFU with FP8 on). --smoke runs llmtrain+fp8 in emulation;
- hf: transformers LlamaForCausalLM of the same shape (attn_implementation=sdpa), same loss/optimizer.
MFU = tokens/s x model FLOPs/token (llmtrain.train.flops) / peak (device table; --peak-tflops).
mem_gib is torch.cuda.max_memory_allocated over the timed steps; est_gib the planner's estimate.

    python bench/gpu_throughput.py                      # on a GPU machine (H100: ~5-10 min)
    python bench/gpu_throughput.py --models 1b --variants llmtrain reference
    python bench/gpu_throughput.py --smoke              # CPU, tiny shapes: checks the script runs
"""

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from bench.common import ReferenceLoop, print_table, timed, write_results

VARIANTS = {  # name: (kind, compile, activation checkpointing)
    "llmtrain": ("llmtrain", False, False),
    "llmtrain+compile": ("llmtrain", True, False),
    "llmtrain+ac": ("llmtrain", False, True),
    "llmtrain+compile+ac": ("llmtrain", True, True),
    "llmtrain+fp8": ("llmtrain", False, False),
    "llmtrain+compile+fp8": ("llmtrain", True, False),
    "reference": ("reference", False, False),
    "reference+compile": ("reference", True, False),
    "reference+compile+ac": ("reference", True, True),
    "hf": ("hf", False, False),
}
FP8_VARIANTS = {"llmtrain+fp8": "rowwise", "llmtrain+compile+fp8": "rowwise"}  # parallel.fp8.recipe
MICRO_BATCH = {"125m": 8, "1b": 4, "smoke": 2}


def model_overrides(name: str, seq: int) -> list[str]:
    if name == "smoke":
        return [
            "model=tiny",
            "model.dim=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.vocab_size=256",
            "model.ffn_dim=128",
            f"model.max_seq_len={seq}",
            f"data.seq_len={seq}",
        ]
    return [f"model={name}", f"data.seq_len={seq}"]


def applied(model: torch.nn.Module) -> tuple[bool, bool]:
    """(compiled, checkpointed): whether the engine really transformed the model. Compiled blocks
    carry `_compiled_call_impl` (Module.compile) or are OptimizedModule; checkpointed ones carry the
    composable `checkpoint` in their registry, or are CheckpointWrapper modules."""
    from torch.distributed._composable.contract import _get_registry

    mods = list(model.modules())
    compiled = any(
        type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) for m in mods
    )
    ckpt = any(
        type(m).__name__ == "CheckpointWrapper" or "checkpoint" in (_get_registry(m) or {}) for m in mods
    )
    return bool(compiled), ckpt


def build_llmtrain(cfg, device: torch.device, step_batches):
    from llmtrain.parallel import ParallelDims
    from llmtrain.parallel.build import build_engine

    engine = build_engine(cfg, ParallelDims(1, 1, 1, 1, 1), None, device)
    model = getattr(engine, "model", None) or engine.modules[0]
    return (lambda: engine.train_step(step_batches, cfg.optim.lr)), applied(model), engine


def build_hf(args, device: torch.device, inputs, targets, lr: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.max_seq_len,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_embeddings,
        rms_norm_eps=args.norm_eps,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=device.type == "cuda")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, (False, False), model


def run_variant(
    model_name: str, variant: str, opts: argparse.Namespace, device: torch.device, peak: float
) -> dict:
    from llmtrain.data.loader import Batch
    from llmtrain.models import model_args
    from llmtrain.plan.memory import Layout, estimate_memory
    from llmtrain.testing import compose_config
    from llmtrain.train.flops import flops_per_token, recompute_fraction

    kind, comp, ac = VARIANTS[variant]
    fp8 = FP8_VARIANTS.get(variant, "none")
    mbs = opts.micro_batch or MICRO_BATCH[model_name]
    cfg = compose_config(
        [
            *model_overrides(model_name, opts.seq),
            "trainer.precision=bf16",
            "tracking=none",
            f"parallel.compile={str(comp).lower()}",
            f"parallel.activation_checkpoint={'full' if ac else 'none'}",
            f"trainer.micro_batch_size={mbs}",
            f"trainer.global_batch_size={mbs}",
            f"parallel.fp8.recipe={fp8}",
            f"parallel.fp8.emulate={str(fp8 != 'none' and device.type != 'cuda').lower()}",
        ]
    )
    args = model_args(cfg.model)
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(0, args.vocab_size, (mbs, opts.seq + 1), generator=gen).to(device)
    inputs, targets = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
    row = {"model": model_name, "variant": variant, "micro_batch": mbs, "seq": opts.seq}
    try:
        if kind == "llmtrain":
            step, (did_compile, did_ac), _owner = build_llmtrain(cfg, device, [Batch(inputs, targets)])
        elif kind == "reference":
            ref = ReferenceLoop(
                args, device, precision="bf16", compile=comp, checkpoint=ac, fused=device.type == "cuda"
            )
            step, (did_compile, did_ac), _owner = (lambda: ref.step(inputs, targets)), (comp, ac), ref
        else:
            step, (did_compile, did_ac), _owner = build_hf(args, device, inputs, targets, cfg.optim.lr)
        warm = opts.warmup + (3 if comp else 0)
        for _ in range(warm):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(lambda: [step() for _ in range(opts.steps)], device) / opts.steps
        tokens = mbs * opts.seq
        mfu_flops = flops_per_token(args, opts.seq)
        hfu_flops = flops_per_token(
            args, opts.seq, recompute_fraction("full" if did_ac else "none", args.n_layers)
        )
        if kind != "hf":  # the planner's estimate next to the measured peak (same code base)
            layout = Layout(micro_batch_size=mbs, activation_checkpoint="full" if did_ac else "none")
            row["est_gib"] = estimate_memory(args, opts.seq, layout, precision="bf16").total / 2**30
        row.update(
            {
                "compiled": did_compile,
                "checkpointed": did_ac,
                "step_ms": seconds * 1e3,
                "tokens_per_s": tokens / seconds,
                "mfu": tokens / seconds * mfu_flops / peak / 1e12,
                "hfu": tokens / seconds * hfu_flops / peak / 1e12,
                "mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
            }
        )
        if fp8 != "none":
            from llmtrain.train.perf import peak_tflops

            fp8_peak = opts.peak_tflops_fp8 or peak_tflops(device, None, torch.float8_e4m3fn)
            row["mfu_fp8"] = tokens / seconds * mfu_flops / fp8_peak / 1e12 if fp8_peak else None
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM (lower --micro-batch)"
    except Exception as e:  # a variant that cannot run here is reported, not fatal for the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return row


def run_all(opts: argparse.Namespace, device: torch.device, peak: float) -> list[dict]:
    rows = []
    for m in opts.models:
        for v in opts.variants:
            rows.append(run_variant(m, v, opts, device, peak))
            print(rows[-1], flush=True)
            gc.collect()  # the variant's model and optimizer are gone once run_variant returned
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["125m", "1b"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=None, help="default: 8 for 125m, 4 for 1b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument(
        "--peak-tflops-fp8", type=float, default=None, help="FP8 peak for mfu_fp8 (default: table)"
    )
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 1 step, no compile: a self-check")
    opts = ap.parse_args()
    from llmtrain.train.perf import peak_tflops

    if opts.smoke:
        opts.models, opts.seq, opts.steps, opts.warmup = ["smoke"], 64, 1, 1
        opts.variants = [v for v in opts.variants if "compile" not in v]
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_throughput.py needs a CUDA GPU (use --smoke to check it on CPU)")
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_tflops(device, opts.peak_tflops, torch.bfloat16)
    if peak is None:
        raise SystemExit(f"unknown peak for {torch.cuda.get_device_name()}: pass --peak-tflops")
    rows = run_all(opts, device, peak)
    cols = [
        "model",
        "variant",
        "micro_batch",
        "compiled",
        "checkpointed",
        "step_ms",
        "tokens_per_s",
        "mfu",
        "mfu_fp8",
        "hfu",
        "mem_gib",
        "est_gib",
        "error",
    ]
    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, peak {peak:.4g} TFLOP/s"
    )
    table = print_table(rows, cols)
    best_1b = max(
        (r.get("mfu", 0.0) for r in rows if r["model"] == "1b" and r["variant"].startswith("llmtrain")),
        default=None,
    )
    if best_1b is not None:
        print(
            f"goal: >= 50% MFU for 1b with llmtrain: best {best_1b:.1%} -> {'met' if best_1b >= 0.5 else 'NOT met'}"
        )
    write_results(
        "gpu_throughput" + ("_smoke" if opts.smoke else ""),
        {"config": vars(opts), "peak_tflops": peak, "rows": rows, "table": table},
    )


if __name__ == "__main__":
    main()
