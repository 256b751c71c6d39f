"""Shared pieces of the parallel tests: a tiny model config and one function that trains a layout
through the real engine (`build_engine`) on real data batches, the code path the trainer uses."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# dim 32, 4 layers (pp2 x 2 virtual stages), GQA 4/2 heads, vocab 320 (byte tokenizer), seq 16;
# global batch 8 = micro 2 x accumulation 4 at dp=1, x 2 at dp=2.
TINY = [
    "model.dim=32",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=64",
    "model.vocab_size=320",
    "model.max_seq_len=64",
    "data.seq_len=16",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    "trainer.seed=7",
    "optim.lr=3e-3",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "optim.grad_clip=1.0",
    "trainer.device=cpu",
    "tracking=none",
]

# layout name -> parallel overrides; world size is the product of the degrees
LAYOUTS_2 = {
    "dp2": ["parallel=ddp"],
    "zero1_dp2": ["parallel=zero1"],
    "zero2_dp2": ["parallel=zero2"],
    "zero3_dp2": ["parallel=zero3"],
    "tp2": ["parallel=tp2"],
    "tp2_nosp": ["parallel=tp2", "parallel.sequence_parallel=false"],
    "pp2_gpipe": ["parallel=pp2", "parallel.pp_schedule=gpipe"],
    "pp2_1f1b": ["parallel=pp2", "parallel.pp_schedule=1f1b"],
    "pp2_interleaved": [
        "parallel=pp2",
        "parallel.pp_schedule=interleaved_1f1b",
        "parallel.pp_virtual_stages=2",
    ],
    # zero bubble (backward split into input and weight passes): looped, then V placement
    "pp2_interleaved_zb": [
        "parallel=pp2",
        "parallel.pp_schedule=interleaved_zb",
        "parallel.pp_virtual_stages=2",
    ],
    "pp2_zbv": ["parallel=pp2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"],
    "pp2_dualpipev": ["parallel=pp2", "parallel.pp_schedule=dualpipev", "parallel.pp_virtual_stages=2"],
    "pp2_uneven_1_3": ["parallel=pp2", "parallel.pp_layers_per_stage=[1,3]"],
    "zero3_dp2_ac_full": ["parallel=zero3", "parallel.activation_checkpoint=full"],
    "tp2_ac_selective": ["parallel=tp2", "parallel.activation_checkpoint=selective"],
    "zero3_dp2_bf16": ["parallel=zero3", "parallel.param_dtype=bf16"],
}
LAYOUTS_4 = {
    "tp2_dp2": ["parallel=tp2"],
    "pp2_dp2": ["parallel=pp2"],
    "tp2_pp2": ["parallel=tp2_pp2"],
    "zero3_tp2": ["parallel=zero3", "parallel.tp=2"],
    "hsdp_2x2": ["parallel=hsdp"],
}


def make_cfg(data_dir: str, run_root: str, overrides: list[str]):
    from llmtrain.testing import compose_config

    return compose_config([f"data.sources.0.path={data_dir}", f"run.root={run_root}", *TINY, *overrides])


def train_layout(
    cfg: Any,
    world_size: int,
    rank: int,
    steps: int,
    *,
    skip: int = 0,
    save: Path | None = None,
    load: Path | None = None,
    want_state: Path | None = None,
    probe: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Build the engine for `cfg` on `world_size` ranks (world 1: no process group), optionally load a
    checkpoint, skip `skip` steps of data, train `steps` steps; losses/grad norms per step, and the
    full model state when asked (every layout must return the same names and values); `probe(engine)`
    after each step, its answers under "probe"."""
    from llmtrain.config import batch_geometry
    from llmtrain.data import build_train_loader
    from llmtrain.parallel.build import build_engine
    from llmtrain.parallel.layout import build_dims

    dims = build_dims(cfg, world_size)
    mesh = dims.build_mesh("cpu") if world_size > 1 else None
    engine = build_engine(cfg, dims, mesh, torch.device("cpu"))
    if load is not None:
        engine.load(load)
    loader = build_train_loader(
        cfg.data,
        micro_batch_size=cfg.trainer.micro_batch_size,
        grad_accum=batch_geometry(cfg, dims.dp),
        dp_rank=dims.coords(rank)["dp"],
        dp_size=dims.dp,
    )
    for _ in range(skip):
        loader.next_step()
    losses, norms, probed = [], [], []
    for _ in range(steps):
        res = engine.train_step(loader.next_step(), cfg.optim.lr)
        losses.append(res.loss)
        norms.append(res.grad_norm)
        if probe is not None:
            probed.append(probe(engine))
    if save is not None:
        engine.save(save)
    # evaluation (forward only; pipelined layouts run the schedule's eval) on the next step's batches
    out: dict[str, Any] = {"loss": losses, "grad_norm": norms, "eval": [engine.evaluate(loader.next_step())]}
    if cfg.model.moe_num_experts:  # router statistics of the layers of every stage (a pp collective)
        from llmtrain.models.moe import moe_stats

        out["moe"] = moe_stats(engine.model, getattr(engine, "pp_group", None))
    if probe is not None:
        out["probe"] = probed
    if want_state is not None:
        # large results go through a file: the result queue of a spawned rank is for small payloads
        state = engine.full_model_state()
        if rank == 0:
            torch.save(state, want_state)
        out["state"] = str(want_state)
    return out


def load_state(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def rel_err(a: list[float], b: list[float]) -> float:
    """Largest relative difference between two traces."""
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))
