"""The planner's pipeline bubble per schedule (llmtrain/plan/pipeline.py) and its use in the step time."""

import pytest

from llmtrain.config.model import ModelConfig
from llmtrain.models import model_args
from llmtrain.plan.fit import Cluster, Layout, plan_layout
from llmtrain.plan.pipeline import bubble_fraction


def test_bubble_fraction_textbook_values() -> None:
    # p = 4 ranks, m = 8 micro-batches, v = 2 chunks per rank
    assert bubble_fraction("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved_1f1b", 4, 8, 2) == pytest.approx(3 / 19)
    assert bubble_fraction("interleaved_zb", 4, 8, 2) == pytest.approx(3 / 51)  # a third of interleaved
    assert bubble_fraction("zbv", 4, 8, 2) == 0.0
    assert bubble_fraction("dualpipev", 4, 8, 2) == 0.0
    assert bubble_fraction("zbv", 4, 7, 2) == pytest.approx(3 / 45)  # below 2p: not yet zero
    assert bubble_fraction("1f1b", 1, 8) == 0.0
    # more micro-batches shrink every bubble; the zero-bubble ones stay below 1F1B's
    for m in (4, 8, 16):
        assert bubble_fraction("zbv", 2, m, 2) <= bubble_fraction("interleaved_zb", 2, m, 2)
        assert bubble_fraction("interleaved_zb", 2, m, 2) < bubble_fraction("interleaved_1f1b", 2, m, 2)
        assert bubble_fraction("interleaved_1f1b", 2, m, 2) < bubble_fraction("1f1b", 2, m)
    with pytest.raises(ValueError, match="pp_schedule='zb'"):
        bubble_fraction("zb", 2, 4)


def test_plan_step_time_stretches_compute_by_the_schedule_bubble() -> None:
    args = model_args(
        ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=1024, max_seq_len=64)
    )
    plans = {
        s: plan_layout(
            args,
            64,
            8,
            Layout(pp=2, micro_batch_size=1, pp_schedule=s, pp_virtual_stages=v),
            Cluster(),
            "bf16",
        )
        for s, v in (("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2))
    }
    ideal = plans["1f1b"].hw_flops_per_step / (2 * 989.4e12 * 0.4)
    pp_comm = plans["1f1b"].step_time_s - ideal * (1 + 1 / 8)  # the exposed pp traffic (same for all)
    assert plans["zbv"].step_time_s == pytest.approx(ideal + pp_comm)  # m = 8 >= 2p: no bubble
    assert plans["interleaved_1f1b"].step_time_s == pytest.approx(ideal * (1 + 1 / 16) + pp_comm)
