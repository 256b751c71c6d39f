"""The DeepSpeed JSON is a pure function of our typed config (no DeepSpeed needed for these)."""

import pytest

from llmtrain.config.validate import ConfigError
from llmtrain.parallel.backends.ds_config import deepspeed_config
from tests.engines.common import OVERRIDES


def test_batch_clipping_precision_and_no_optimizer(make_config) -> None:
    cfg = make_config(*OVERRIDES, "parallel=zero2", "trainer.precision=bf16", "optim.grad_clip=0.25")
    ds = deepspeed_config(cfg, dp=2, grad_accum=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8 == cfg.trainer.global_batch_size
    assert ds["gradient_clipping"] == 0.25  # never DeepSpeed's silent default of 1.0
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"] == {"stage": 2}
    assert "optimizer" not in ds and "scheduler" not in ds  # torch AdamW + our LR schedule


def test_clipping_disabled_is_explicit_zero(make_config) -> None:
    assert deepspeed_config(make_config(*OVERRIDES, "optim.grad_clip=0"), 1, 4)["gradient_clipping"] == 0.0


def test_cpu_offload_per_stage(make_config) -> None:
    z3 = deepspeed_config(make_config(*OVERRIDES, "parallel=zero3", "parallel.cpu_offload=true"), 2, 2)
    assert z3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert z3["zero_optimization"]["offload_param"]["device"] == "cpu"
    z1 = deepspeed_config(make_config(*OVERRIDES, "parallel=zero1", "parallel.cpu_offload=true"), 2, 2)
    assert "offload_param" not in z1["zero_optimization"]  # only ZeRO-3 partitions parameters
    with pytest.raises(ConfigError, match="zero_stage >= 1"):
        deepspeed_config(make_config(*OVERRIDES, "parallel.cpu_offload=true"), 2, 2)


def test_nvme_offload_needs_a_path_and_unknown_options_fail(make_config) -> None:
    base = [*OVERRIDES, "parallel=zero3"]
    with pytest.raises(ConfigError, match="offload_nvme_path"):
        deepspeed_config(make_config(*base, "+parallel.engine_options.offload_optimizer=nvme"), 2, 2)
    ok = deepspeed_config(
        make_config(
            *base,
            "+parallel.engine_options.offload_param=nvme",
            "+parallel.engine_options.offload_nvme_path=/nvme",
        ),
        2,
        2,
    )
    assert ok["zero_optimization"]["offload_param"] == {
        "device": "nvme",
        "pin_memory": False,
        "nvme_path": "/nvme",
    }
    with pytest.raises(ConfigError, match=r"unknown keys.*offload_optimiser"):
        deepspeed_config(make_config(*base, "+parallel.engine_options.offload_optimiser=cpu"), 2, 2)


def test_buckets_capped_at_the_model_size(make_config) -> None:
    cfg = make_config(*OVERRIDES, "parallel=zero2")
    zero = deepspeed_config(cfg, 2, 2, num_params=10_000_000)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 10_000_000
    big = deepspeed_config(cfg, 2, 2, num_params=70_000_000_000)["zero_optimization"]
    assert big["reduce_bucket_size"] == 500_000_000  # DeepSpeed's own default for large models
    opt = "+parallel.engine_options.reduce_bucket_size=123"
    explicit = deepspeed_config(make_config(*OVERRIDES, "parallel=zero2", opt), 2, 2, num_params=10_000_000)
    assert explicit["zero_optimization"]["reduce_bucket_size"] == 123
