"""Step time vs model size and sequence length on CPU, against what the FLOPs formula predicts.

Each point runs llmtrain's `train_step` (fp32, one micro-batch, AdamW, clipping) on random tokens:
one warm-up step, then the median of `--steps` timed steps. `step_s` is process CPU time (with
one thread it is the step's compute time even when other jobs share the cores); `wall_s` is kept
too. Sizes vary `dim` at fixed layers and sequence; the sequence sweep keeps tokens per step
fixed, so any growth is the attention term.
Writes bench/results/scaling.json and the plot docs/scaling_cpu.png.

    python bench/scaling.py [--steps 3 --threads 1]
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import print_table, timed_cpu, write_results

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 2048  # tokens per step in every point


def measure(dim: int, n_layers: int, seq: int, steps: int) -> dict[str, float]:
    from llmtrain.config.optim import OptimConfig
    from llmtrain.data.loader import Batch
    from llmtrain.models.llama import Transformer, TransformerArgs
    from llmtrain.optim import build_optimizer
    from llmtrain.parallel.step import StepContext, train_step
    from llmtrain.train.flops import flops_per_token

    args = TransformerArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=max(dim // 64, 2),
        vocab_size=320,
        max_seq_len=seq,
        ffn_dim=dim * 8 // 3 // 8 * 8,
    )
    model = Transformer(args)
    model.init_weights(0)
    opt = build_optimizer(model, OptimConfig())
    gen = torch.Generator().manual_seed(0)
    batch = TOKENS // seq
    toks = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=gen)
    batches = [Batch(toks[:, :-1].contiguous(), toks[:, 1:].contiguous())]

    def step() -> None:
        train_step(model, opt, batches, StepContext(dp_size=1, dp_group=None, grad_clip=1.0))

    step()
    times = [timed_cpu(step, torch.device("cpu")) for _ in range(steps)]
    wall, t = statistics.median(w for w, _ in times), statistics.median(c for _, c in times)
    non_emb = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    flops = flops_per_token(args, seq) * TOKENS
    return {
        "dim": dim,
        "n_layers": n_layers,
        "seq": seq,
        "batch": batch,
        "params_m": non_emb / 1e6,
        "step_s": t,
        "wall_s": wall,
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / t / 1e9,
    }


def plot(sizes: list[dict], seqs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, rows, key, label in (
        (axes[0], sizes, "params_m", "non-embedding parameters (M)"),
        (axes[1], seqs, "seq", "sequence length (tokens/step fixed)"),
    ):
        x = [r[key] for r in rows]
        y = [r["step_s"] for r in rows]
        mid = rows[len(rows) // 2]
        scale = mid["step_s"] / mid["gflop_per_step"]  # FLOPs-proportional time through the middle point
        ax.plot(x, y, "o-", label="measured")
        ax.plot(x, [r["gflop_per_step"] * scale for r in rows], "--", label="FLOPs-proportional")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("step CPU time (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_title(f"model size (4 layers, seq 256, {TOKENS} tok/step)")
    axes[1].set_title("sequence length (dim 256, 4 layers)")
    fig.suptitle(f"llmtrain train_step on CPU ({torch.get_num_threads()} thread(s), fp32)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256, 384, 512])
    ap.add_argument("--seqs", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "scaling_cpu.png")
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    sizes = [measure(d, 4, 256, opts.steps) for d in opts.dims]
    seqs = [measure(256, 4, s, opts.steps) for s in opts.seqs]
    cols = [
        "dim",
        "n_layers",
        "seq",
        "batch",
        "params_m",
        "step_s",
        "wall_s",
        "gflop_per_step",
        "achieved_gflops",
    ]
    print("model size:")
    print_table(sizes, cols)
    print("\nsequence length:")
    print_table(seqs, cols)
    plot(sizes, seqs, opts.plot)
    write_results(
        "scaling", {"config": {k: str(v) for k, v in vars(opts).items()}, "sizes": sizes, "seqs": seqs}
    )


if __name__ == "__main__":
    main()
