"""Counter-based, layout-independent init: the hash is SplitMix64, values do not depend on how a
tensor is chunked or sharded, every layout gets the single-process weights bitwise, and a rank only
computes its own shard (peak memory of the init of a tp8-sharded layer is a fraction of the layer)."""

import math

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from llmtrain.models import build_model, init
from llmtrain.parallel.dims import ParallelDims
from llmtrain.parallel.parallelize import parallelize
from llmtrain.plan.dry_run import fake_world
from llmtrain.plan.measure import PeakTensorMemory
from llmtrain.testing import compose_config

M64 = (1 << 64) - 1
MODEL = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=250"]


def _splitmix_reference(key: int, index: int) -> float:
    """SplitMix64 in plain Python integers (the published algorithm), as a uniform in (0, 1)."""
    z = (index * 0x9E3779B97F4A7C15 + key) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return ((z >> 11) + 0.5) * 2.0**-53


def test_uniforms_are_splitmix64_of_the_global_index():
    key = init.param_key(7, "layers.0.attention.wq.weight")
    idx = torch.tensor([0, 1, 2, 12345, 2**40 + 3], dtype=torch.int64)
    got = init.uniforms(key, idx).tolist()
    assert got == [_splitmix_reference(key & M64, int(i)) for i in idx]


def test_values_do_not_depend_on_the_chunk_size(monkeypatch):
    draw = init.trunc_normal(0.02)
    a, b = torch.empty(37, 19), torch.empty(37, 19)
    init.fill_param(a, draw, seed=1, name="w")
    monkeypatch.setattr(init, "CHUNK", 5)  # 1 row at a time
    init.fill_param(b, draw, seed=1, name="w")
    assert torch.equal(a, b)


def test_trunc_normal_statistics():
    w = torch.empty(512, 512)
    init.fill_param(w, init.trunc_normal(0.02), seed=0, name="w")
    assert w.abs().max() <= 3 * 0.02
    # std of N(0, 1) truncated at +-3 is 0.98658
    assert w.std().item() == pytest.approx(0.02 * 0.98658, rel=0.01)
    assert abs(w.mean().item()) < 0.02 * 4 / math.sqrt(w.numel())


def _single_process_weights(overrides: list[str]) -> dict[str, torch.Tensor]:
    model = build_model(compose_config(overrides).model)
    model.to_empty(device="cpu")
    model.init_weights(0)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _build_rank(overrides: list[str], rank: int, world: int):
    """Rank `rank`'s parallelized model through the real parallelize on a fake world."""
    cfg = compose_config(overrides)
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world)
    mesh = dims.build_mesh("cpu")
    return parallelize(build_model(cfg.model), dims, p, mesh, torch.device("cpu"), 0)


LAYOUTS = {
    "dp2 (ddp)": (["parallel=ddp"], 2),
    "zero3 dp2": (["parallel=zero3"], 2),
    "zero3 dp3 (uneven shards)": (["parallel=zero3"], 3),
    "tp2": (["parallel=tp2"], 2),
    "pp2": (["parallel=pp2", "trainer.global_batch_size=8", "trainer.micro_batch_size=2"], 2),
    "3d tp2 pp2 zero3 dp2": (
        ["parallel=3d", "trainer.global_batch_size=16", "trainer.micro_batch_size=2"],
        8,
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_rank_holds_the_single_process_weights_bitwise(layout: str):
    overrides, world = LAYOUTS[layout]
    overrides = [*MODEL, *overrides]
    ref = _single_process_weights(overrides)
    for rank in sorted({0, 1, world - 1}):
        with fake_world(rank, world):
            pm = _build_rank(overrides, rank, world)
            seen = 0
            for module in pm.modules:
                target = getattr(module, "module", module)
                for name, p in target.named_parameters():
                    full = ref[name]
                    if isinstance(p, DTensor):
                        shape, off = compute_local_shape_and_global_offset(
                            p.shape, p.device_mesh, p.placements
                        )
                        full = full[tuple(slice(o, o + s) for o, s in zip(off, shape))]
                        p = p.to_local()
                    assert torch.equal(p.detach(), full), f"{layout} rank {rank}: {name}"
                    seen += 1
            assert seen > 0


def test_init_of_a_tp8_shard_computes_only_the_shard():
    """Before the counter-based generator every rank drew the global tensor (8x the shard here)."""
    overrides = ["model.dim=256", "model.n_layers=1", "model.n_heads=8", "model.n_kv_heads=8"]
    overrides += ["model.vocab_size=32768", "model.ffn_dim=1024", "parallel=tp2", "parallel.tp=8"]
    cfg = compose_config(overrides)
    p = cfg.parallel
    with fake_world(0, 8):
        dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, 8)
        mesh = dims.build_mesh("cpu")
        model = build_model(cfg.model)
        with PeakTensorMemory() as mem:
            pm = parallelize(model, dims, p, mesh, torch.device("cpu"), 0)
    embedding = 32768 * 256 * 4  # bytes of the global embedding (the largest tensor)
    local = sum(t.to_local().numel() for t in pm.modules[0].parameters()) * 4
    assert mem.peak < local + embedding / 4, (mem.peak, local, embedding)
