"""Costs of the fine-tuning objectives next to a training step (CPU, one process).

    .venv/bin/python bench/objectives.py [--model 125m] [--out bench/results/objectives.json]

For a model preset it measures:
  * masked-LM batch transform time per step against the forward/backward time of that step;
  * SFT packing efficiency (share of row positions holding an example) for a realistic spread of
    example lengths, and the collate time per step;
  * LoRA: trainable parameters and optimizer state against full fine-tuning (rank 8 on wq, wv and
    rank 16 on all projections), and the forward/backward time with the base frozen.
Prints a table and writes JSON.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmtrain.config.objective import MaskedLMConfig  # noqa: E402
from llmtrain.data.loader import Batch  # noqa: E402
from llmtrain.data.tokenizer import ByteTokenizer  # noqa: E402
from llmtrain.models import build_model  # noqa: E402
from llmtrain.models.lora import apply_lora, init_lora  # noqa: E402
from llmtrain.objectives.masked_lm import MaskedLMTransform  # noqa: E402
from llmtrain.objectives.sft_data import Example, SFTLoader  # noqa: E402
from llmtrain.parallel.step import forward_loss_sum  # noqa: E402
from llmtrain.testing import compose_config  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def fwd_bwd(model: torch.nn.Module, batch: Batch) -> None:
    forward_loss_sum(model, batch).backward()
    model.zero_grad(set_to_none=True)


def model_for(preset: str, lora: tuple[int, list[str]] | None) -> torch.nn.Module:
    model = build_model(compose_config([f"model={preset}"]).model, device="meta")
    if lora:
        apply_lora(model, lora[0], 2.0 * lora[0], 0.0, lora[1])
    model.to_empty(device="cpu")
    model.init_weights(0)
    if lora:
        init_lora(model, 0)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "objectives.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    b, s, rows = args.batch, args.seq, []
    tokens = torch.randint(0, 256, (b, s))
    plain = Batch(tokens, torch.roll(tokens, -1, 1))
    full = model_for(args.model, None)
    t_step = timed(lambda: fwd_bwd(full, plain), args.repeat)
    rows.append(("causal LM fwd+bwd per micro-batch", f"{t_step * 1e3:.1f} ms", ""))

    mlm = MaskedLMTransform(MaskedLMConfig(), seed=0, mask_token_id=258, num_random_tokens=258)
    t_mask = timed(lambda: mlm([plain], 1), args.repeat * 5)
    masked = mlm([plain], 1)[0]
    t_mlm_step = timed(lambda: fwd_bwd(full, masked), args.repeat)
    rows.append(
        (
            "masked-LM transform per micro-batch",
            f"{t_mask * 1e3:.2f} ms",
            f"{t_mask / t_mlm_step:.1%} of its step",
        )
    )

    rng = np.random.default_rng(0)  # prompt ~ lognormal(mean ~60), response ~ lognormal(mean ~120) tokens
    lengths = np.clip(rng.lognormal(4.0, 0.6, 4000) + rng.lognormal(4.6, 0.7, 4000), 4, s + 1).astype(int)
    examples = [Example([1] * n, [False] * (n // 3) + [True] * (n - n // 3)) for n in lengths]
    loader = SFTLoader(examples, seq_len=s, pad_id=ByteTokenizer.pad_id, micro_batch_size=b, grad_accum=1)
    fill = float(sum(n - 1 for n in lengths) / (len(loader.rows) * s))
    t_collate = timed(loader.next_step, args.repeat * 5)
    rows.append(
        (
            "SFT packing: row positions used",
            f"{fill:.1%}",
            f"{len(examples)} examples -> {len(loader.rows)} rows",
        )
    )
    rows.append(
        ("SFT collate per micro-batch", f"{t_collate * 1e3:.2f} ms", f"{t_collate / t_step:.1%} of a step")
    )

    n_full = sum(p.numel() for p in full.parameters())
    result = {
        "model": args.model,
        "batch": b,
        "seq": s,
        "step_ms": t_step * 1e3,
        "mlm_transform_ms": t_mask * 1e3,
        "mlm_step_ms": t_mlm_step * 1e3,
        "sft_fill": fill,
        "sft_collate_ms": t_collate * 1e3,
        "params": n_full,
        "lora": {},
    }
    for name, spec in {
        "r8 wq,wv": (8, ["wq", "wv"]),
        "r16 all": (16, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]),
    }.items():
        m = model_for(args.model, spec)
        n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        t = timed(lambda m=m: fwd_bwd(m, plain), args.repeat)
        rows.append(
            (
                f"LoRA {name}: trainable / optimizer state",
                f"{n_train / n_full:.2%}",
                f"fwd+bwd {t * 1e3:.1f} ms ({t / t_step:.2f}x full)",
            )
        )
        result["lora"][name] = {"trainable": n_train, "fraction": n_train / n_full, "step_ms": t * 1e3}
    print(
        f"model={args.model} ({n_full / 1e6:.1f}M params), micro-batch {b}x{s}, CPU {torch.get_num_threads()} threads"
    )
    for r in rows:
        print(f"  {r[0]:<44} {r[1]:>10}   {r[2]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
