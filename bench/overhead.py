"""Framework overhead on CPU: llmtrain's real training loop vs a minimal hand-written PyTorch loop.

Both run in this process on the same model shape and init, micro-batch, sequence length and torch
threads; rounds alternate (llmtrain, reference, llmtrain, ...) so that load from other processes
hits both alike. The llmtrain side is `Trainer.train()` itself, extended by `--steps-per-round`
steps each round: Arrow data loading, LR schedule, engine.train_step (token-weighted loss,
accumulation, clipping), meter, profiler hook and the per-step train_log.jsonl line all count.
Validation is switched off (it is not part of a step). The reference feeds in-memory tensors.

    python bench/overhead.py [--rounds 8 --steps-per-round 6 --dim 256 --layers 4 --seq 256 --batch 8]

ratio = reference step time / llmtrain step time (1.0 = no overhead; goal >= 0.97), in wall time and
in process CPU time; on a shared machine the CPU-time ratio is the one to trust (it does not move
when other jobs take the cores), the wall ratio shows how noisy the round was.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import ReferenceLoop, print_table, timed_cpu, write_results


def build_trainer(opts: argparse.Namespace, workdir: Path):
    from llmtrain.data.prepare import prepare_dataset
    from llmtrain.distributed.env import DistEnv
    from llmtrain.testing import compose_config
    from llmtrain.train.trainer import Trainer

    data = workdir / "shakespeare-byte"
    prepare_dataset("builtin:shakespeare", data, "byte", shard_tokens=1 << 20, val_fraction=0.05)
    cfg = compose_config(
        [
            f"data.sources.0.path={data}",
            f"run.root={workdir / 'runs'}",
            "run.name=overhead",
            "tracking=none",
            "model=tiny",
            f"model.dim={opts.dim}",
            f"model.n_layers={opts.layers}",
            f"model.n_heads={opts.heads}",
            f"model.n_kv_heads={opts.heads // 2}",
            f"model.ffn_dim={opts.dim * 8 // 3 // 8 * 8}",
            f"model.max_seq_len={opts.seq}",
            f"data.seq_len={opts.seq}",
            f"trainer.micro_batch_size={opts.batch}",
            f"trainer.global_batch_size={opts.batch}",
            f"trainer.num_threads={opts.threads}",
            "trainer.max_steps=1",
            "trainer.log_every=1000000",
            "trainer.val_every=0",
            "checkpoint.enabled=false",
        ]
    )
    trainer = Trainer(cfg, DistEnv(0, 0, 1, 1))
    trainer.validate = lambda: None  # validation is not part of a training step
    return trainer, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps-per-round", type=int, default=6)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, cfg = build_trainer(opts, Path(tmp))
        from llmtrain.models import model_args

        args = model_args(cfg.model)
        o = cfg.optim
        ref = ReferenceLoop(
            args,
            torch.device("cpu"),
            lr=o.lr,
            weight_decay=o.weight_decay,
            grad_clip=o.grad_clip,
            seed=cfg.trainer.seed,
        )
        gen = torch.Generator().manual_seed(0)
        toks = torch.randint(
            0, args.vocab_size, (opts.steps_per_round, opts.batch, opts.seq + 1), generator=gen
        )
        k = opts.steps_per_round

        def run_llmtrain() -> None:
            trainer.cfg.trainer.max_steps = trainer.step + k
            trainer.train()

        def run_reference() -> None:
            for i in range(k):
                ref.step(toks[i, :, :-1], toks[i, :, 1:])

        run_llmtrain(), run_reference()  # warm-up round, not timed
        rows = []
        for r in range(opts.rounds):
            first, second = (run_llmtrain, run_reference) if r % 2 == 0 else (run_reference, run_llmtrain)
            t = {first: timed_cpu(first, torch.device("cpu")), second: timed_cpu(second, torch.device("cpu"))}
            (lw, lc), (rw, rc) = t[run_llmtrain], t[run_reference]
            rows.append(
                {
                    "round": r,
                    "llmtrain_wall_s": lw / k,
                    "reference_wall_s": rw / k,
                    "ratio_wall": rw / lw,
                    "llmtrain_cpu_s": lc / k,
                    "reference_cpu_s": rc / k,
                    "ratio_cpu": rc / lc,
                }
            )
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0] if key != "round"}
    print_table(rows, list(rows[0]))
    tokens = opts.batch * opts.seq
    summary = {
        **{f"median_{k}": v for k, v in med.items()},
        "tokens_per_step": tokens,
        "llmtrain_tokens_per_cpu_s": tokens / med["llmtrain_cpu_s"],
        "reference_tokens_per_cpu_s": tokens / med["reference_cpu_s"],
    }
    print(
        f"\nmedian step: llmtrain {med['llmtrain_wall_s'] * 1e3:.1f} ms wall / {med['llmtrain_cpu_s'] * 1e3:.1f} ms "
        f"CPU, reference {med['reference_wall_s'] * 1e3:.1f} ms wall / {med['reference_cpu_s'] * 1e3:.1f} ms CPU"
    )
    print(
        f"ratio reference/llmtrain (median of interleaved rounds): CPU time {med['ratio_cpu']:.3f}, "
        f"wall {med['ratio_wall']:.3f} (goal >= 0.97)"
    )
    write_results("overhead", {"config": vars(opts), "rounds": rows, "summary": summary})


if __name__ == "__main__":
    main()
