"""Skipped optimizer steps under parallel.backend=deepspeed and megatron (docs/resilience.md).

Each engine trains data steps 0-4 on 2 gloo ranks. Step 1: rank 0's output is NaN (only rank 0: the
loss all-reduce and the global norm must carry it to the other rank). Step 3: finite, refused by
`skip_when` (what a spike does; DeepSpeed never skips a finite step by itself). Across each skipped
step the weights, every optimizer-state tensor (Adam moments and `step` counts) and DeepSpeed's
counters must be bitwise what they were; the kept steps must equal the native single-process run on
data steps 0, 2, 4 within the engines' parity tolerances (docs/engines.md), which they miss by far if a
skipped step left gradients behind or moved Adam.
"""

import copy
import math

import pytest
import torch

from llmtrain.resilience.inject import scaled_outputs
from tests.distributed import run_distributed
from tests.engines.common import LR, OVERRIDES, native_reference, rank_batches

NAN_AT, SKIP_AT, RUN = 1, 3, 5
KEPT = [s for s in range(RUN) if s not in (NAN_AT, SKIP_AT)]
COUNTERS = ("global_steps", "global_samples", "micro_steps")


def _optim_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for state in opt.state.values():
        out += [
            v.detach().clone() if torch.is_tensor(v) else torch.tensor(v) for _, v in sorted(state.items())
        ]
    return out


def _skipping_run(engine, rank: int, dp: int, dp_rank: int, state, adam: torch.optim.Optimizer) -> dict:
    """Data steps 0..RUN-1 with the NaN and the refused step; `state()` snapshots the engine, `adam` is
    the torch optimizer that holds the Adam state."""
    seen: list[tuple[float, float]] = []

    def skip_when(loss: float, norm: float) -> bool:
        seen.append((loss, norm))
        return not (math.isfinite(loss) and math.isfinite(norm)) or len(seen) - 1 == SKIP_AT

    assert engine.set_skip_when(skip_when), f"{engine.kind} cannot skip"
    # DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 bf16) takes one zero-gradient AdamW step when it is built
    initial = max((float(s["step"]) for s in adam.state.values()), default=0.0)
    out: dict = {"kept": [], "skipped": [], "unchanged": []}
    for s in range(RUN):
        before = state() if s in (NAN_AT, SKIP_AT) else None
        with scaled_outputs(engine.modules[-1:], math.nan if s == NAN_AT and rank == 0 else None):
            res = engine.train_step(rank_batches(s, dp, dp_rank), LR)
        out["skipped"].append(res.skipped)
        if before is None:
            out["kept"].append((res.loss, res.grad_norm))
        else:
            after = state()
            out["unchanged"].append(len(before) == len(after) and all(map(torch.equal, before, after)))
    out["seen"] = [(str(a), str(b)) for a, b in seen]  # NaN != NaN: compare the ranks' texts
    out["adam_steps"] = sorted({float(s["step"]) - initial for s in adam.state.values()})
    return out


def _ds_cases(rank: int, world: int, cfg, cases: dict) -> dict:
    from llmtrain.parallel.backends.deepspeed import DeepSpeedEngine
    from llmtrain.parallel.dims import ParallelDims

    out = {}
    for name, (stage, precision) in cases.items():
        c = copy.deepcopy(cfg)
        c.parallel.zero_stage, c.trainer.precision = stage, precision
        engine = DeepSpeedEngine(c, ParallelDims(1, world, 1, 1, world), None, torch.device("cpu"))
        ds = engine.engine

        def state(engine=engine, ds=ds) -> list[torch.Tensor]:
            weights = [v for _, v in sorted(engine.full_model_state().items())]
            return [
                *weights,
                *_optim_tensors(engine.base_optimizer),
                torch.tensor([getattr(ds, k) for k in COUNTERS]),
            ]

        out[name] = _skipping_run(engine, rank, world, rank, state, engine.base_optimizer)
        out[name]["counters"] = [getattr(ds, k) for k in (*COUNTERS, "skipped_steps")]
        out[name]["weights"] = {k: v.numpy() for k, v in engine.full_model_state().items()}
        out[name]["optimizer"] = type(ds.optimizer).__name__
    return out


DS_CASES = {  # every DeepSpeed optimizer wrapper our configs reach (ds_skip.py)
    "zero0": (0, "fp32"),  # torch AdamW itself
    "zero0_bf16": (0, "bf16"),  # FP16_UnfusedOptimizer in bf16
    "zero1_bf16": (1, "bf16"),  # DeepSpeedZeroOptimizer in bf16 (its bf16.check_grad_overflow path)
    "zero2": (2, "fp32"),  # DeepSpeedZeroOptimizer: its own overflow path skips the NaN step
    "zero3": (3, "fp32"),  # DeepSpeedZeroOptimizer_Stage3: its own overflow path too
}


def _check(name: str, r0: dict, r1: dict, ref: list, tol: float) -> None:
    for key in ("skipped", "kept", "seen", "adam_steps", "unchanged"):
        assert r0[key] == r1[key], f"{name}: ranks disagree on {key}"
    assert r0["skipped"] == [s in (NAN_AT, SKIP_AT) for s in range(RUN)], name
    assert r0["unchanged"] == [True, True], f"{name}: a skipped step changed weights/optimizer/counters"
    assert r0["seen"][NAN_AT][0] == "nan" and len(r0["seen"]) == RUN, f"{name}: {r0['seen']}"
    assert r0["adam_steps"] == [float(len(KEPT))], f"{name}: Adam step counts {r0['adam_steps']}"
    for (loss, norm), (want_loss, want_norm) in zip(r0["kept"], ref, strict=True):
        assert abs(loss - want_loss) / want_loss < tol, f"{name}: {r0['kept']} vs native {ref}"
        assert abs(norm - want_norm) / want_norm < 10 * max(tol, 1e-5), f"{name}: {r0['kept']} vs {ref}"


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_deepspeed_skips_nan_and_refused_steps_on_every_stage(make_config) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install 'llmtrain[deepspeed]'")
    cfg = make_config(*OVERRIDES, "parallel.backend=deepspeed")
    final: dict = {}
    ref = native_reference(cfg, final_state=final, data_steps=KEPT)
    r0, r1 = run_distributed(_ds_cases, world_size=2, args=(cfg, DS_CASES), timeout=220)
    for name, (_, precision) in DS_CASES.items():
        _check(name, r0[name], r1[name], ref, 1e-3 if precision == "bf16" else 1e-6)
        # DeepSpeed's counters as if the two batches had never been drawn; both skips counted
        assert r0[name]["counters"] == [len(KEPT), len(KEPT) * 8, len(KEPT) * 2, 2], name
        worst = max(abs(torch.from_numpy(r0[name]["weights"][k]) - final[k]).max().item() for k in final)
        assert worst < (1e-2 if precision == "bf16" else 1e-5), f"{name}: weights off native by {worst}"
    assert [r0[n]["optimizer"] for n in DS_CASES] == [
        "AdamW",
        "FP16_UnfusedOptimizer",
        "DeepSpeedZeroOptimizer",
        "DeepSpeedZeroOptimizer",
        "DeepSpeedZeroOptimizer_Stage3",
    ]


MG_CASES = {"dp2": (2, 1, 1), "pp2": (1, 1, 2)}  # (dp, tp, pp); under pp2 rank 0 never sees the loss


def _mg_cases(rank: int, world: int, cfg) -> dict:
    from tests.engines import megatron_cpu_shim

    megatron_cpu_shim.install()
    from llmtrain.parallel.backends.megatron import MegatronEngine
    from llmtrain.parallel.dims import ParallelDims

    out = {}
    for name, (dp, tp, pp) in MG_CASES.items():
        c = copy.deepcopy(cfg)
        c.parallel.sequence_parallel = False
        dims = ParallelDims(dp, 1, tp, pp, world)
        engine = MegatronEngine(c, dims, None, torch.device("cpu"))

        def state(engine=engine) -> list[torch.Tensor]:
            weights = [p.detach().clone() for m in engine.modules for p in m.parameters()]
            return [*weights, *_optim_tensors(engine.optimizer)]

        out[name] = _skipping_run(engine, rank, dims.dp, dims.coords(rank)["dp"], state, engine.optimizer)
        out[name]["weights"] = {k: v.numpy() for k, v in engine.full_model_state().items()}
    return out


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_megatron_skips_nan_and_refused_steps(make_config) -> None:
    pytest.importorskip(
        "megatron.core", reason="megatron-core is not installed: pip install 'llmtrain[megatron]'"
    )
    cfg = make_config(*OVERRIDES, "parallel.backend=megatron")
    final: dict = {}
    ref = native_reference(cfg, final_state=final, data_steps=KEPT)
    r0, r1 = run_distributed(_mg_cases, world_size=2, args=(cfg,), timeout=220)
    for name in MG_CASES:
        _check(name, r0[name], r1[name], ref, 1e-6)
        got = r0[name]["weights"]
        worst = max(abs(torch.from_numpy(got[k]) - final[k]).max().item() for k in got)
        assert worst < 1e-5, f"{name}: weights off native by {worst}"
