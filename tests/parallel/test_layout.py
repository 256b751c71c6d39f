"""Impossible layouts fail at config time (compose, or `build_dims` for world-size rules) with a
message naming the keys; presets compose and resolve to the documented degrees."""

import re

import pytest

from llmtrain.config import ConfigError
from llmtrain.config.rules import stage_layer_counts
from llmtrain.parallel import ParallelDims
from llmtrain.parallel.layout import build_dims
from llmtrain.parallel.pipeline import local_stage_ids
from tests.parallel.common import TINY


@pytest.fixture
def cfg(make_config):
    return lambda *o: make_config(*TINY, *o)


@pytest.mark.parametrize(
    ("overrides", "world", "expected"),
    [
        (["parallel=tp2_pp2"], 2, {"tp": 2, "pp": 2}),  # needs 4 ranks
        (["parallel=tp2"], 3, {"tp": 2}),
    ],
)
def test_world_size_mismatch_lists_every_factor(cfg, overrides, world, expected) -> None:
    with pytest.raises(ConfigError) as e:
        build_dims(cfg(*overrides), world)
    msg = str(e.value)
    for key in ("dp_replicate=", "dp_shard=", "tp=", "pp="):
        assert key in msg
    assert f"world size {world}" in msg


def test_expert_parallel_that_does_not_divide_dp_names_every_factor(cfg) -> None:
    """ep is carved from the data-parallel ranks: dp = 3 (3 ranks) cannot hold ep2; on 8 ZeRO ranks
    ep2 leaves edp 4, ep innermost."""
    with pytest.raises(ConfigError) as e:
        build_dims(cfg("model=moe_tiny", "parallel.ep=2", "parallel.tp=1", "parallel.dp_replicate=-1"), 3)
    msg = str(e.value)
    for key in ("parallel.ep=2", "dp_replicate=3", "dp_shard=1", "= 3", "tp=1", "pp=1", "world size 3"):
        assert key in msg, (key, msg)
    dims = build_dims(
        cfg("model=moe_tiny", "parallel=zero3", "parallel.ep=2", "trainer.micro_batch_size=1"), 8
    )
    assert (dims.ep, dims.edp) == (2, 4)
    assert [dims.coords(r)["ep"] for r in range(4)] == [0, 1, 0, 1]  # ep innermost in dp
    assert [dims.coords(r)["edp"] for r in range(0, 8, 2)] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["parallel.pp=3"], ["model.n_layers=4", "3 pipeline stages", "pp_layers_per_stage"]),
        (
            ["parallel.pp=2", "parallel.pp_layers_per_stage=[1,2]"],
            ["pp_layers_per_stage=[1, 2]", "n_layers=4"],
        ),
        (["parallel.tp=3"], ["model.n_heads=4", "parallel.tp=3"]),
        (["parallel.tp=4"], ["model.n_kv_heads=2", "parallel.tp=4", "KV-head"]),
        (["parallel.pp=2", "parallel.pp_microbatches=1"], ["parallel.pp_microbatches=1", "parallel.pp=2"]),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], ["pp_virtual_stages >= 2"]),
        (["parallel.pp=2", "parallel.pp_virtual_stages=2"], ["pp_schedule=1f1b", "pp_virtual_stages=1"]),
        (
            ["parallel.pp=2", "parallel.pp_schedule=interleaved_zb"],
            ["interleaved_zb", "pp_virtual_stages >= 2"],
        ),
        (["parallel.pp=2", "parallel.pp_schedule=zbv"], ["pp_schedule=zbv", "pp_virtual_stages=2", "got 1"]),
        (
            [
                "parallel.pp=2",
                "parallel.pp_schedule=zbv",
                "parallel.pp_virtual_stages=2",
                "parallel.compile=true",
            ],
            ["parallel.compile=true", "pp_schedule=zbv", "torch.compile"],
        ),
        (
            [
                "parallel.pp=2",
                "parallel.pp_schedule=dualpipev",
                "parallel.pp_virtual_stages=3",
                "model.n_layers=6",
            ],
            ["pp_schedule=dualpipev", "pp_virtual_stages=2", "got 3"],
        ),
        (
            [
                "parallel.pp=2",
                "parallel.pp_schedule=dualpipev",
                "parallel.pp_virtual_stages=2",
                "parallel.pp_microbatches=3",
            ],
            ["parallel.pp_microbatches=3", ">= 4", "pp_schedule=dualpipev", "2 x parallel.pp stages"],
        ),
        (
            [
                "parallel.pp=2",
                "parallel.pp_schedule=zbv",
                "parallel.pp_virtual_stages=2",
                "parallel.pp_microbatches=2",
            ],
            ["parallel.pp_microbatches=2", ">= 3", "pp_schedule=zbv"],
        ),
        (["parallel.dp_shard=2", "parallel.zero_stage=0"], ["parallel.dp_shard=2", "zero_stage"]),
        (["parallel.param_dtype=bf16"], ["parallel.param_dtype=bf16", "zero_stage=0"]),
        (["parallel.tp=2", "data.seq_len=15"], ["data.seq_len=15", "sequence_parallel"]),
        (["parallel.ep=2"], ["parallel.ep=2", "model.moe_num_experts=0"]),
        (["model=moe_tiny", "parallel.ep=3"], ["parallel.ep=3", "model.moe_num_experts=8"]),
        (["parallel.ep=0"], ["parallel.ep", "must be >= 1"]),
    ],
)
def test_impossible_layout_fails_at_compose_naming_keys(cfg, overrides, needles) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(*overrides)
    for needle in needles:
        assert needle in str(e.value)


def test_microbatches_fewer_than_stages_fail_for_the_world_size(cfg) -> None:
    # global 4 = micro 2 x accumulation 2 on one pipeline replica: fine; on 2 replicas only 1 micro-batch
    c = cfg("parallel=pp2", "trainer.global_batch_size=4")
    assert build_dims(c, 2).pp == 2
    with pytest.raises(ConfigError, match=re.escape("fewer than 2 with parallel.pp=2")):
        build_dims(c, 4)


def test_dualpipev_needs_two_microbatches_per_rank_for_the_world_size(cfg) -> None:
    # global 8 = micro 2 x accumulation 4: 4 micro-batches fill DualPipeV's 4 stages on 2 ranks; on 2
    # replicas (world 4) each pipeline gets 2, which 1F1B accepts and DualPipeV refuses
    c = cfg("parallel=pp2", "parallel.pp_schedule=dualpipev", "parallel.pp_virtual_stages=2")
    assert build_dims(c, 2).pp == 2
    assert build_dims(cfg("parallel=pp2"), 4).dp == 2
    with pytest.raises(
        ConfigError, match=re.escape("= 2 pipeline micro-batches is fewer than 4 with parallel.pp=2")
    ):
        build_dims(c, 4)


def test_pipeline_validation_batches_must_split_into_microbatches(cfg) -> None:
    c = cfg("parallel=pp2", "parallel.pp_microbatches=4", "trainer.val_batches=1")  # 2 rows, 4 micro-batches
    with pytest.raises(ConfigError, match=re.escape("trainer.val_batches")):
        build_dims(c, 2)


def test_zero_without_a_shard_dimension_is_rejected(cfg) -> None:
    with pytest.raises(ConfigError, match=re.escape("parallel.zero_stage=3 shards over parallel.dp_shard")):
        build_dims(cfg("parallel=zero3", "parallel.dp_replicate=-1", "parallel.dp_shard=1"), 2)


@pytest.mark.parametrize(
    ("preset", "world", "degrees"),
    [
        ("ddp", 4, (4, 1, 1, 1)),
        ("zero1", 4, (1, 4, 1, 1)),
        ("zero2", 2, (1, 2, 1, 1)),
        ("zero3", 2, (1, 2, 1, 1)),
        ("hsdp", 4, (2, 2, 1, 1)),
        ("tp2", 4, (2, 1, 2, 1)),
        ("pp2", 4, (2, 1, 1, 2)),
        ("tp2_pp2", 8, (2, 1, 2, 2)),
        ("3d", 8, (1, 2, 2, 2)),
    ],
)
def test_presets_resolve(cfg, preset, world, degrees) -> None:
    d = build_dims(cfg(f"parallel={preset}"), world)
    assert (d.dp_replicate, d.dp_shard, d.tp, d.pp) == degrees


def test_stage_split_and_placement() -> None:
    assert stage_layer_counts(8, 4, None) == [2, 2, 2, 2]
    assert stage_layer_counts(8, 2, [3, 5]) == [3, 5]
    assert local_stage_ids(1, 2, 2) == [1, 3]  # looped placement for interleaved 1F1B
    assert local_stage_ids(1, 2, 2, "interleaved_zb") == [1, 3]
    # V placement: rank r holds r and 2 pp - 1 - r (rank 0 the first and the last stage)
    assert [local_stage_ids(r, 2, 2, "zbv") for r in range(2)] == [[0, 3], [1, 2]]
    assert [local_stage_ids(r, 4, 2, "dualpipev") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    dims = ParallelDims(1, 2, 2, 2, 8)
    # mesh order pp, dp_replicate, dp_shard, cp, tp: tp peers are neighbours, cp peers next
    assert dims.coords(5) == {"tp": 1, "cp": 0, "dp_shard": 0, "dp_replicate": 0, "pp": 1, "dp": 0}
    cp_dims = ParallelDims(2, 1, 2, 1, 8, cp=2)  # cp ranks of one dp rank share its data (same "dp")
    assert [cp_dims.coords(r)["dp"] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [cp_dims.coords(r)["cp"] for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
