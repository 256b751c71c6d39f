"""megatron-core engine: weight conversion, logits equality after conversion, and loss parity with the
single-process native run for DP2, TP2, PP2 (1F1B), PP2 interleaved and tied-embedding TP2/PP2 on 2
gloo ranks.

The ranks run megatron's own GPTModel, schedules and DDP under the TEST-ONLY CPU shim
(tests/engines/megatron_cpu_shim.py): megatron-core 0.16 is CUDA-only in its buffer allocation and RNG
tracker. That the shim is sound is what these numbers show: losses equal the native ones to < 1e-6
relative (measured <= 6e-8) and grad norms to < 1e-5. Needs CUDA (marked `gpu`): sequence parallelism
(apex/TransformerEngine norms) — refused on CPU with that reason, checked below.
"""

import copy
from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint.state import RankState, TrainerState
from llmtrain.config.validate import ConfigError
from llmtrain.parallel.dims import ParallelDims
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

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip(
    "megatron.core", reason="megatron-core is not installed: pip install 'llmtrain[megatron]'"
)

CASES = {  # name: (dp, tp, pp, virtual stages, extra overrides)
    "dp2": (2, 1, 1, 1, []),
    "tp2": (1, 2, 1, 1, []),
    "pp2_1f1b": (1, 1, 2, 1, []),
    "pp2_interleaved": (1, 1, 2, 2, ["model.n_layers=4", "parallel.pp_schedule=interleaved_1f1b"]),
    # tied embeddings across stages: megatron keeps a copy on the last stage and all-reduces its grad
    "pp2_tied": (1, 1, 2, 1, ["model.tie_embeddings=true"]),
    "tp2_tied": (1, 2, 1, 1, ["model.tie_embeddings=true"]),
}


def _engine(cfg, dp: int, tp: int, pp: int, vp: int, world: int):
    from llmtrain.parallel.backends.megatron import MegatronEngine

    cfg = copy.deepcopy(cfg)
    cfg.parallel.sequence_parallel, cfg.parallel.pp_virtual_stages = False, vp
    dims = ParallelDims(dp, 1, tp, pp, world)
    return MegatronEngine(cfg, dims, None, torch.device("cpu")), dims


def _tp_logits(engine, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of the (single-chunk) TP model: gather the vocab shards."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    chunk = engine.modules[0].module
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        local = chunk(tokens, positions, None)  # (b, s, vocab / tp)
    parts = [torch.empty_like(local) for _ in range(engine.dims.tp)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)


def _all_cases(rank: int, world: int, cfgs: dict, ckpt: str) -> dict:
    from tests.engines import megatron_cpu_shim

    megatron_cpu_shim.install()
    out: dict = {}
    for name, (dp, tp, pp, vp, _) in CASES.items():
        engine, dims = _engine(cfgs[name], dp, tp, pp, vp, world)
        if name == "tp2":  # conversion check before training: same logits as the native model
            out["tp2_logits0"] = _tp_logits(engine, rank_batches(0, 1, 0)[0].inputs).numpy()
        out[name] = run_steps(engine, dims.dp, dims.coords(rank)["dp"])
        if name in ("tp2", "pp2_interleaved"):  # conversion back: gathered native-named weights
            out[f"{name}_state"] = {k: v.numpy() for k, v in engine.full_model_state().items()}
        if name == "pp2_1f1b":  # round trip through our checkpoint manager: the resumed engine continues
            from llmtrain.checkpoint import CheckpointManager
            from llmtrain.config.io import to_dict

            manager = CheckpointManager(f"{ckpt}/checkpoints")
            path = manager.save(
                STEPS, engine, TrainerState(config=to_dict(cfgs[name])), RankState()
            ).done.result()
            resumed, _ = _engine(cfgs[name], dp, tp, pp, vp, world)
            manager.load(path, resumed)
            out["continued"] = run_steps(engine, 1, 0, steps=1, first=STEPS)
            out["resumed"] = run_steps(resumed, 1, 0, steps=1, first=STEPS)
        if name == "tp2":  # switching engines: start from a native checkpoint's weights
            switched, _ = _engine(cfgs[name], dp, tp, pp, vp, world)
            switched.load(f"{ckpt}/native", load_optimizer=False)
            out["tp2_switch"] = switch_check(switched, 1, 0)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_megatron_parity_dp_tp_pp(make_config, tmp_path) -> None:
    cfgs = {
        name: make_config(*OVERRIDES, "parallel.backend=megatron", *extra)
        for name, (*_, extra) in CASES.items()
    }
    refs, states = {}, {}
    for name, cfg in cfgs.items():
        states[name] = {}
        refs[name] = native_reference(cfg, final_state=states[name])
    write_native_checkpoint(states["tp2"], tmp_path / "native")
    r0, r1 = run_distributed(_all_cases, world_size=2, args=(cfgs, str(tmp_path)), timeout=220)
    for name in CASES:
        assert r0[name] == r1[name], f"{name}: ranks disagree on the global loss"
        d_loss, d_norm = max_rel_diff(r0[name], refs[name])
        assert d_loss < 1e-6 and d_norm < 1e-5, (
            f"{name}: loss {d_loss:.2e}, grad norm {d_norm:.2e} off native"
        )
    # logits after native -> megatron conversion (QKV fusion, RoPE row permutation, fused gate/up, TP split)
    from llmtrain.models import build_model

    model = build_model(cfgs["tp2"].model, "cpu")
    model.init_weights(cfgs["tp2"].trainer.seed)
    with torch.no_grad():
        want = model(rank_batches(0, 1, 0)[0].inputs)
    assert (torch.from_numpy(r0["tp2_logits0"]) - want).abs().max() < 1e-5
    # megatron -> native after training: the same weights as the native run
    for name in ("tp2", "pp2_interleaved"):
        got, ref = r0[f"{name}_state"], states[name]
        assert set(got) == set(ref) - {"rope"} or set(got) == set(ref)
        worst = max((torch.from_numpy(got[k]) - ref[k]).abs().max().item() for k in got)
        assert worst < 1e-5, f"{name}: converted-back weights differ from native by {worst}"
    assert r0["resumed"] == r0["continued"]
    # offline tool: that PP2 checkpoint -> native checkpoint equal to the native run's weights
    import importlib.util

    from llmtrain.checkpoint.dcp_io import read_tensors, tensor_shapes

    spec = importlib.util.spec_from_file_location("to_native", ROOT / "tools" / "to_native.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tool.to_native(tmp_path / "checkpoints", tmp_path / "as_native")
    folder = out / "model_optim"
    native = read_tensors(folder, sorted(tensor_shapes(folder)))
    assert set(native) == set(states["pp2_1f1b"])
    assert max((native[k] - states["pp2_1f1b"][k]).abs().max().item() for k in native) < 1e-5
    want = native_switch_reference(cfgs["tp2"], states["tp2"])
    assert max(abs(g - w) / w for g, w in zip(r0["tp2_switch"], want)) < 1e-6, (r0["tp2_switch"], want)


@pytest.fixture
def megatron_checks():
    from llmtrain.parallel.backends import megatron as backend

    return backend.check_supported


@pytest.mark.parametrize(
    ("overrides", "dims", "match"),
    [
        (["parallel.zero_stage=1", "parallel.dp_shard=1"], (2, 1, 1, 1), "DistributedOptimizer"),
        (["parallel.sequence_parallel=true"], (1, 2, 1, 1), "sequence_parallel=true .* needs CUDA"),
        (["parallel.sequence_parallel=false"], (1, 1, 2, 1), "needs a GPU"),  # no shim in this process
        (["data.document_mask=true"], (1, 1, 1, 1), "document_mask"),
        (
            ["model.n_layers=4", "parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"],
            (1, 1, 2, 1),
            "pp_schedule=zbv: megatron runs 1f1b and interleaved_1f1b",
        ),
    ],
)
def test_cpu_refusals_name_the_key(make_config, megatron_checks, overrides, dims, match) -> None:
    import megatron.core

    assert not getattr(megatron.core, "_llmtrain_cpu_shim", False), "the shim must stay out of this process"
    cfg = make_config(*OVERRIDES, "parallel.backend=megatron", *overrides)
    with pytest.raises(ConfigError, match=match):
        megatron_checks(
            cfg, ParallelDims(dims[0], 1, dims[1], dims[2], dims[0] * dims[1] * dims[2]), torch.device("cpu")
        )


def test_uneven_layer_split_is_refused_with_the_config(make_config) -> None:
    """megatron splits layers evenly; the rule is the config's own (config/rules.py), checked once at
    compose time for every engine, so the engine does not repeat it."""
    with pytest.raises(ConfigError, match="n_layers=3 is not divisible by 2 pipeline stages"):
        make_config(*OVERRIDES, "parallel.backend=megatron", "model.n_layers=3", "parallel.pp=2")


def _gpu_sp_case(rank: int, world: int, cfg) -> list:
    from llmtrain.parallel.backends.megatron import MegatronEngine

    torch.cuda.set_device(rank)
    dims = ParallelDims(1, 1, 2, 1, world)
    return run_steps(MegatronEngine(cfg, dims, None, torch.device("cuda", rank)), 1, 0)


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="TP2 + sequence parallel needs 2 CUDA devices: "
    "megatron's SP uses CUDA streams and apex/TransformerEngine norms",
)
def test_megatron_sequence_parallel_on_gpu(make_config) -> None:
    cfg = make_config(
        *OVERRIDES, "parallel.backend=megatron", "parallel.sequence_parallel=true", "trainer.device=cuda"
    )
    ref = native_reference(cfg)
    r0, _ = run_distributed(_gpu_sp_case, world_size=2, args=(cfg,), backend="nccl")
    assert max_rel_diff(r0, ref)[0] < 1e-4  # TF32/cuBLAS reductions on GPU
