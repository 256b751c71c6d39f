"""Shared bench helpers: the minimal hand-written reference loop, tables and JSON results."""

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmtrain.models.llama import Transformer, TransformerArgs

RESULTS = Path(__file__).resolve().parent / "results"


class ReferenceLoop:
    """What a careful engineer writes by hand: the same Transformer, AdamW, clipping, mean CE loss,
    optional bf16 autocast, torch.compile, fused AdamW and per-block checkpointing. No framework."""

    def __init__(
        self,
        args: TransformerArgs,
        device: torch.device,
        *,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        grad_clip: float = 1.0,
        precision: str = "fp32",
        compile: bool = False,
        fused: bool = False,
        checkpoint: bool = False,
        seed: int = 42,
    ) -> None:
        with torch.device(device):
            model = Transformer(args)
        model.init_weights(seed, buffer_device=device)
        if checkpoint:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            for key in list(model.layers):
                model.layers[key] = checkpoint_wrapper(model.layers[key])
        if compile:
            for key in list(model.layers):
                model.layers[key].compile()
        self.model, self.grad_clip, self.device = model, grad_clip, device
        extra = {"fused": True} if fused else {}
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **extra)
        self.dtype = torch.bfloat16 if precision == "bf16" else None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of fn(), synchronizing the accelerator on both ends."""
    return timed_cpu(fn, device)[0]


def timed_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn(). On a shared CPU machine the process CPU
    time is what the work cost: it does not grow while other jobs hold the cores."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def print_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """Markdown table of rows (floats to 4 significant digits); printed and returned."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bench_model_overrides(dim: int, layers: int, seq: int, vocab: int) -> list[str]:
    """Config overrides of the small GQA decoder the multi-rank benches train (4 heads / 2 KV heads,
    SwiGLU width 4 x dim), without tracking or checkpoints: one definition so their numbers compare."""
    return [
        f"model.dim={dim}",
        f"model.n_layers={layers}",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        f"model.vocab_size={vocab}",
        f"model.ffn_dim={4 * dim}",
        f"model.max_seq_len={seq}",
        f"data.seq_len={seq}",
        "optim.grad_clip=1.0",
        "tracking=none",
        "checkpoint.enabled=false",
    ]


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name><$LLMTRAIN_BENCH_SUFFIX>.json with the machine description added (run_all
    --quick sets the suffix so that smoke runs never replace full results)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{os.environ.get('LLMTRAIN_BENCH_SUFFIX', '')}.json"
    path.write_text(
        json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}, indent=2)
    )
    print(f"wrote {path}")
    return path
