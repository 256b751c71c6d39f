"""MoE under data and tensor parallelism: 2 gloo ranks (DDP, ZeRO-3, ZeRO-3 with full activation
checkpointing, tp2 with and without sequence parallel, pp2 1F1B and interleaved) against 1 process
with accumulation.

The router's aux losses (per row, weighted by target tokens), the expert loads that drive the bias
update (all-reduced over dp) and the router choices must not depend on the layout: loss, grad norm and
the final weights (selection biases included) and the router statistics (imbalance, aux and z-loss,
bias range per layer: gathered from every pipeline stage) equal the single-process run within 1e-5
over 5 steps.
"""

from pathlib import Path

import pytest
import torch

from llmtrain.data.loader import IGNORE_INDEX, Batch
from tests.distributed import run_distributed
from tests.parallel.common import load_state, make_cfg, rel_err, train_layout

STEPS = 5
MOE = [
    "model.moe_num_experts=4",
    "model.moe_top_k=2",
    "model.moe_expert_dim=48",
    "model.moe_shared_experts=1",
    "model.moe_first_k_dense=1",
    "model.moe_aux_loss_coef=0.05",
    "model.moe_z_loss_coef=0.01",
    "model.moe_bias_update_rate=0.01",
]
LAYOUTS = {
    "dp2": ["parallel=ddp"],
    "zero3_dp2": ["parallel=zero3"],
    "zero3_dp2_ac_full": ["parallel=zero3", "parallel.activation_checkpoint=full"],
    # attention tensor-parallel, the MoE layers replicated on both tp ranks
    "tp2": ["parallel=tp2"],
    "tp2_nosp": ["parallel=tp2", "parallel.sequence_parallel=false"],
    # router losses attached in the stage that owns each MoE layer (stage 0 holds dense layer 0)
    "pp2_1f1b": ["parallel=pp2"],
    # blocks recomputed in the backward: the recomputation must not re-attach the router losses
    "pp2_ac_full": ["parallel=pp2", "parallel.activation_checkpoint=full"],
    # 4 stages of one layer each, the first dense
    "pp2_interleaved": [
        "parallel=pp2",
        "parallel.pp_schedule=interleaved_1f1b",
        "parallel.pp_virtual_stages=2",
    ],
}


def _padded_steps(vocab: int) -> list[list[Batch]]:
    """Three steps of 4 micro-batches of 2 rows whose target counts differ by row and micro-batch
    (SFT-like padding): a pipelined MoE layer must weight each micro-batch's router terms with that
    micro-batch's own rows (packed pretraining rows are all full and would not tell)."""
    g = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(3):
        micro = []
        for m in range(4):
            tokens = torch.randint(0, vocab, (2, 17), generator=g)
            targets = tokens[:, 1:].clone()
            for r in range(2):
                targets[r, : 3 * m + 6 * r] = IGNORE_INDEX
            micro.append(Batch(tokens[:, :-1], targets))
        steps.append(micro)
    return steps


def _train_padded(cfg, world: int, rank: int) -> dict:
    """(loss, grad norm) of each padded step through the real engine, the second step skipped (as
    llmtrain.resilience skips a non-finite one: its router loads must not reach the bias or the
    statistics), and the router statistics after the three steps."""
    from llmtrain.models.moe import moe_stats
    from llmtrain.parallel.build import build_engine
    from llmtrain.parallel.layout import build_dims

    dims = build_dims(cfg, world)
    engine = build_engine(cfg, dims, dims.build_mesh("cpu") if world > 1 else None, torch.device("cpu"))
    skips = iter([False, True, False])
    engine.set_skip_when(lambda loss, norm: next(skips))
    results = [engine.train_step(batches, cfg.optim.lr) for batches in _padded_steps(cfg.model.vocab_size)]
    assert [r.skipped for r in results] == [False, True, False]
    steps = [(r.loss, r.grad_norm) for r in results]
    return {"steps": steps, "moe": moe_stats(engine.model, getattr(engine, "pp_group", None))}


def _spawned(rank: int, world: int, data: str, root: str) -> dict:
    out = {}
    for name, overrides in LAYOUTS.items():
        cfg = make_cfg(data, root, [*MOE, *overrides])
        out[name] = train_layout(cfg, world, rank, STEPS, want_state=Path(root) / f"{name}.pt")
    out["pp2_padded"] = _train_padded(make_cfg(data, root, [*MOE, "parallel=pp2"]), world, rank)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_moe_data_parallel_layouts_match_one_process(shakespeare_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    ref = train_layout(
        make_cfg(str(shakespeare_dir), str(tmp_path), MOE), 1, 0, STEPS, want_state=tmp_path / "ref.pt"
    )
    padded = _train_padded(make_cfg(str(shakespeare_dir), str(tmp_path), MOE), 1, 0)
    runs = run_distributed(_spawned, 2, args=(str(shakespeare_dir), str(tmp_path)), timeout=250)[0]
    got_padded = runs.pop("pp2_padded")
    for (loss, norm), (want_loss, want_norm) in zip(got_padded["steps"], padded["steps"], strict=True):
        assert rel_err([loss, norm], [want_loss, want_norm]) <= 1e-5, (got_padded, padded)
    assert sorted(got_padded["moe"]) == sorted(padded["moe"])
    for key, value in padded["moe"].items():
        assert abs(got_padded["moe"][key] - value) <= 1e-5 * max(abs(value), 1.0), ("padded", key)
    want = load_state(ref["state"])
    bias_keys = [k for k in want if k.endswith("expert_bias")]
    assert bias_keys and all(want[k].abs().max() > 0 for k in bias_keys)  # the bias really moved
    for name, run in runs.items():
        assert rel_err(run["loss"], ref["loss"]) <= 1e-5, (name, run["loss"], ref["loss"])
        assert rel_err(run["grad_norm"], ref["grad_norm"]) <= 1e-5, (name, run["grad_norm"])
        got = load_state(run["state"])
        assert sorted(got) == sorted(want), name
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        assert worst <= 1e-5, f"{name}: weights after {STEPS} steps differ by {worst:.2e}"
        assert sorted(run["moe"]) == sorted(ref["moe"]), name  # every layer reported, stages gathered
        for key, value in ref["moe"].items():
            assert abs(run["moe"][key] - value) <= 1e-5 * max(abs(value), 1.0), (
                name,
                key,
                run["moe"][key],
                value,
            )
