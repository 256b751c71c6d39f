"""DeepSpeed engine: parity with the single-process native run for ZeRO 0/1/2/3 (+ offload, bf16) on
2 gloo ranks (ZeRO-3 models built partitioned under zero.Init), save/load through our checkpoint
manager, resuming on another world size, loading a native checkpoint (engine switch), the generated
JSON, and export of full weights.

All cases share one spawned process group: importing DeepSpeed costs ~2 s per process and each engine
~2.5 s to initialize, so one group keeps the whole file around 30 s on 2 cores.
Tolerances: fp32 1e-6 relative (measured <= 4e-8: same AdamW, only the reduction order differs);
bf16 1e-3 relative on the loss, 1e-2 on the grad norm (measured 9.5e-5 and 3.2e-3: DeepSpeed keeps bf16
weights + fp32 masters, the reference is fp32).
"""

import json
from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint.state import RankState, TrainerState
from tests.distributed import run_distributed
from tests.engines.common import (
    OVERRIDES,
    STEPS,
    max_rel_diff,
    native_reference,
    native_switch_reference,
    rank_batches,
    run_steps,
    switch_check,
    write_native_checkpoint,
)

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install 'llmtrain[deepspeed]'")

CASES = [  # (name, zero_stage, extra settings)
    ("zero0", 0, {}),
    ("zero1", 1, {}),
    ("zero2", 2, {}),
    ("zero3", 3, {}),
    ("zero3_cpu_offload", 3, {"cpu_offload": True}),
    ("zero2_bf16", 2, {"precision": "bf16"}),
]


def _engine(cfg, stage: int, extra: dict, world: int):
    import copy

    from llmtrain.parallel.backends.deepspeed import DeepSpeedEngine
    from llmtrain.parallel.dims import ParallelDims

    cfg = copy.deepcopy(cfg)
    cfg.parallel.zero_stage = stage
    cfg.parallel.cpu_offload = extra.get("cpu_offload", False)
    cfg.trainer.precision = extra.get("precision", "fp32")
    dims = ParallelDims(1, world, 1, 1, world)
    return DeepSpeedEngine(cfg, dims, None, torch.device("cpu"))  # needs no mesh (the trainer passes one)


def _all_cases(rank: int, world: int, cfg, ckpt_root: str) -> dict:
    from llmtrain.checkpoint import CheckpointManager

    out: dict = {}
    for name, stage, extra in CASES:
        engine = _engine(cfg, stage, extra, world)
        out[name] = run_steps(engine, world, rank)
        if name == "zero3":  # export (gathers the ZeRO-3 shards) and checkpoint round trip
            from llmtrain.parallel.backends.deepspeed import build_partitioned

            # built under zero.Init: partitioned as constructed, this rank holds only its slice
            built = build_partitioned(engine.cfg, engine.ds_config, torch.device("cpu"))
            out["zero3_built"] = [(p.numel(), p.ds_tensor.numel(), p.ds_numel) for p in built.parameters()]
            # numpy, not tensors: torch would share tensor storage through a file descriptor that dies
            # with the rank process
            out["zero3_state"] = {k: v.numpy() for k, v in engine.full_model_state().items()}
            manager = CheckpointManager(Path(ckpt_root) / "checkpoints")
            path = manager.save(STEPS, engine, TrainerState(), RankState(data={"rank": rank})).done.result()
            out["ckpt_files"] = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
            resumed = _engine(cfg, stage, extra, world)
            manager.load(path, resumed)
            out["continued"] = run_steps(engine, world, rank, steps=1, first=STEPS)
            out["resumed"] = run_steps(resumed, world, rank, steps=1, first=STEPS)
        if name in ("zero1", "zero3"):  # switching engines: start from a native checkpoint's weights
            switched = _engine(cfg, stage, extra, world)
            switched.load(Path(ckpt_root) / "native", load_optimizer=False)
            out[f"{name}_switch"] = switch_check(switched, world, rank)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_deepspeed_parity_all_stages(make_config, tmp_path: Path) -> None:
    cfg = make_config(*OVERRIDES, "parallel.backend=deepspeed")
    ref_state: dict = {}
    ref = native_reference(cfg, final_state=ref_state)
    write_native_checkpoint(ref_state, tmp_path / "native")
    results = run_distributed(_all_cases, world_size=2, args=(cfg, str(tmp_path)), timeout=220)
    r0, r1 = results
    for name, _, extra in CASES:
        assert r0[name] == r1[name], f"{name}: ranks disagree on the global loss"
        d_loss, d_norm = max_rel_diff(r0[name], ref)
        tol = 1e-3 if extra.get("precision") == "bf16" else 1e-6
        assert d_loss < tol, f"{name}: loss differs from native by {d_loss:.2e} (tol {tol})"
        assert d_norm < max(tol, 1e-5) * 10, f"{name}: grad norm differs from native by {d_norm:.2e}"
    # ZeRO-3 models are constructed partitioned (deepspeed.zero.Init): no rank materializes all of it
    for r in (r0, r1):
        assert all(empty == 0 and local == -(-full // 2) for empty, local, full in r["zero3_built"])
    # full weights after 5 steps, gathered from ZeRO-3 shards, under the native names
    assert set(r0["zero3_state"]) == set(ref_state)
    worst = max((torch.from_numpy(r0["zero3_state"][k]) - ref_state[k]).abs().max().item() for k in ref_state)
    assert worst < 1e-5, f"exported ZeRO-3 weights differ from the native run by {worst}"
    # checkpoint through our manager's layout; the resumed engine continues exactly
    assert r0["resumed"] == r0["continued"]
    assert "COMPLETE" in r0["ckpt_files"] and "trainer_state.json" in r0["ckpt_files"]
    assert any(f.startswith("model_optim/deepspeed/") and "optim_states" in f for f in r0["ckpt_files"])
    want = native_switch_reference(cfg, ref_state)
    for name in ("zero1", "zero3"):
        got = r0[f"{name}_switch"]
        assert max(abs(g - w) / w for g, w in zip(got, want)) < 1e-6, f"{name} from native: {got} vs {want}"


def test_generated_json_is_written_and_matches(make_config, tmp_path: Path) -> None:
    """The engine writes exactly `deepspeed_config(...)` into the run folder (1 process, ZeRO-0)."""
    from llmtrain.parallel.backends.deepspeed import DeepSpeedEngine
    from llmtrain.parallel.backends.ds_config import deepspeed_config
    from llmtrain.parallel.dims import ParallelDims

    cfg = make_config(*OVERRIDES, "parallel.backend=deepspeed", "run.name=dsjson")
    torch.set_num_threads(1)
    try:
        engine = DeepSpeedEngine(cfg, ParallelDims(1, 1, 1, 1, 1), None, torch.device("cpu"))
        written = json.loads((Path(cfg.run.root) / "dsjson" / "deepspeed_config.json").read_text())
        assert written == deepspeed_config(cfg, 1, 4, sum(p.numel() for p in engine.model.parameters()))
        res = engine.train_step(rank_batches(0, 1, 0), 3e-3)
        assert abs(res.loss - native_reference(cfg, steps=1)[0][0]) < 1e-6
    finally:  # the engine made a 1-rank process group in the pytest process: later tests (which fork,
        # or check dist.is_initialized()) must not inherit it
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


RESHARD_STAGES = (1, 2, 3)


def _train_and_save(rank: int, world: int, cfg, root: str, stages: tuple[int, ...]) -> dict:
    """Train each ZeRO stage STEPS steps on `world` ranks and save it through our manager."""
    from llmtrain.checkpoint import CheckpointManager

    out = {}
    for stage in stages:
        engine = _engine(cfg, stage, {}, world)
        run_steps(engine, world, rank)
        manager = CheckpointManager(Path(root) / f"zero{stage}_dp{world}" / "checkpoints")
        out[stage] = str(
            manager.save(STEPS, engine, TrainerState(), RankState(data={"rank": rank})).done.result()
        )
    return out


def _one_rank(rank: int, world: int, cfg, root: str, cases: dict) -> tuple:
    """The 1-rank parts: save ZeRO-2 (for 1 -> 2), resume the 2-rank checkpoints, weights only, and
    the refused cross-family load (its message)."""
    saved1 = _train_and_save(rank, world, cfg, root, (2,))
    on1 = _resume(rank, world, cfg, cases["to_one"], True)
    fresh = _resume(rank, world, cfg, cases["weights"], False)
    try:
        _resume(rank, world, cfg, cases["refused"], True)
        refused = "loaded"
    except Exception as e:  # ConfigError, raised before anything is loaded
        refused = str(e)
    return saved1, on1, fresh, refused


def _resume(rank: int, world: int, cfg, cases: dict, load_optimizer: bool) -> dict:
    """Load each checkpoint `path` into a ZeRO-`stage` engine on `world` ranks, run 2 steps."""
    from llmtrain.checkpoint import CheckpointManager

    out = {}
    for name, (stage, path) in cases.items():
        engine = _engine(cfg, stage, {}, world)
        CheckpointManager(Path(path).parent).load(Path(path), engine, load_optimizer=load_optimizer)
        out[name] = run_steps(engine, world, rank, steps=2, first=STEPS)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_zero_checkpoint_resumes_on_another_world_size(make_config, tmp_path: Path) -> None:
    """ZeRO 1-3 checkpoints of 2 ranks resume on 1, and ZeRO-2 of 1 rank on 2, optimizer state included
    (through DeepSpeed's universal checkpoint): the next two steps match the uninterrupted native run.
    The second step after loading depends on the Adam moments, so a weights-only load must miss it (and
    a weights-only load must not smuggle the moments in)."""
    cfg = make_config(*OVERRIDES, "parallel.backend=deepspeed")
    ref = native_reference(cfg, steps=STEPS + 2)[STEPS:]
    root = str(tmp_path)
    saved2 = run_distributed(_train_and_save, world_size=2, args=(cfg, root, RESHARD_STAGES), timeout=200)[0]
    # every 1-rank part in one spawn (each spawn pays DeepSpeed's import again)
    cases = {
        "to_one": {f"zero{s} 2->1": (s, saved2[s]) for s in RESHARD_STAGES},
        "weights": {"zero2": (2, saved2[2]), "zero3": (3, saved2[3])},
        "refused": {"x": (2, saved2[3])},
    }
    saved1, on1, fresh, refused = run_distributed(
        _one_rank, world_size=1, args=(cfg, root, cases), timeout=300
    )[0]
    on2 = run_distributed(
        _resume, world_size=2, args=(cfg, {"zero2 1->2": (2, saved1[2])}, True), timeout=120
    )
    assert on2[0] == on2[1]
    for name, got in [*on1.items(), *on2[0].items()]:
        d_loss, d_norm = max_rel_diff(got, ref)
        assert d_loss < 1e-6 and d_norm < 1e-5, f"{name}: {got} vs uninterrupted {ref}"
    for name, got in fresh.items():  # same weights: same first step; fresh Adam moments: another second
        assert abs(got[0][0] - ref[0][0]) / ref[0][0] < 1e-6, f"{name} weights only: {got} vs {ref}"
        assert abs(got[1][0] - ref[1][0]) / ref[1][0] > 1e-5, f"{name} weights only kept the Adam moments"
    # the conversion is staged in the run folder and removed after loading; the source stays untouched
    assert not list((tmp_path / "runs").glob("*/.ds_universal-*"))
    assert sorted(p.name for p in Path(saved2[2]).iterdir()) == sorted(
        p.name for p in Path(saved1[2]).iterdir()
    )
    # another ZeRO family is refused with the key to change, before anything is loaded
    assert "ZeRO-3 checkpoint cannot load under parallel.zero_stage=2" in refused, refused
