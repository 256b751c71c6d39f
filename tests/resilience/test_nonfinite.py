"""NaN at a step: skipped with the state untouched, equal to a run that never saw that batch; K
consecutive ones roll back to the last checkpoint and the run still finishes (docs/resilience.md)."""

import json
import math
from pathlib import Path

import pytest
import torch

from llmtrain.config.errors import ConfigError
from llmtrain.distributed.env import DistEnv
from llmtrain.parallel.step import StepContext, train_step
from llmtrain.resilience.inject import scaled_outputs
from llmtrain.train.trainer import Trainer
from tests.train.test_trainer import SMALL, _batches, _tiny

ADAM = ["optim.warmup_steps=2", "optim.lr=3e-3", "trainer.log_every=1"]


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters and every optimizer-state tensor (Adam's step counts, moments), in a fixed order."""
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() if torch.is_tensor(v) else torch.tensor(v) for _, v in sorted(opt.state[p].items())]
    return out


def _assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_nonfinite_step_is_skipped_with_params_adam_state_and_grads_untouched():
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen: list[tuple[float, float]] = []

    def skip_when(loss: float, norm: float) -> bool:
        seen.append((loss, norm))
        return not (math.isfinite(loss) and math.isfinite(norm))

    ctx = StepContext(dp_size=1, dp_group=None, grad_clip=1.0, skip_when=skip_when)
    assert not train_step(model, opt, _batches(2, 2), ctx).skipped  # Adam state exists from here on
    before = _state(model, opt)
    with scaled_outputs([model], math.nan):
        res = train_step(model, opt, _batches(2, 2), ctx)
    assert res.skipped and math.isnan(res.loss) and math.isnan(res.grad_norm)
    _assert_bitwise(_state(model, opt), before)  # Adam step count still 1
    assert all(p.grad is None for p in model.parameters())
    assert opt.state[next(model.parameters())]["step"].item() == 1
    assert not train_step(model, opt, _batches(2, 2), ctx).skipped
    assert opt.state[next(model.parameters())]["step"].item() == 2
    assert len(seen) == 3


def _drop_windows(trainer: Trainer, at: int, count: int) -> None:
    """The reference: the loader of this run throws away `count` global batches at data step `at`."""
    loader, calls = trainer.train_loader, [0]
    draw = loader.next_step

    def next_step():
        if calls[0] == at:
            for _ in range(count):
                draw()
        calls[0] += 1
        return draw()

    loader.next_step = next_step


def _run(make_config, name: str, *extra: str, drop: tuple[int, int] | None = None) -> tuple[dict, Trainer]:
    t = Trainer(make_config(*SMALL, *ADAM, f"run.name={name}", *extra), DistEnv(0, 0, 1, 1))
    if drop is not None:
        _drop_windows(t, *drop)
    return t.train(), t


def _events(out: dict) -> list[dict]:
    return [json.loads(x) for x in (Path(out["run_dir"]) / "events.jsonl").read_text().splitlines()]


def test_nan_at_step_k_skips_it_and_equals_the_run_without_that_batch(make_config):
    out, t = _run(make_config, "nan", "trainer.max_steps=6", "resilience.inject_nan_steps=[3]")
    ref_out, ref = _run(make_config, "ref", "trainer.max_steps=6", drop=(3, 1))
    assert out["status"] == "FINISHED" and out["step"] == 6
    assert [h["step"] for h in out["history"]] == [1, 2, 3, 4, 5, 6]  # the skipped attempt left no step
    assert [h["loss"] for h in out["history"]] == [h["loss"] for h in ref_out["history"]]
    _assert_bitwise(
        _state(t.engine.model, t.engine.optimizer), _state(ref.engine.model, ref.engine.optimizer)
    )
    (ev,) = _events(out)
    assert (ev["step"], ev["kind"], ev["action"]) == (3, "nonfinite", "skip")
    assert ev["details"]["loss"] == "nan" and ev["details"]["data_step"] == 3
    assert t.resilience.events.counts["skipped_steps"] == 1


def test_k_consecutive_nans_roll_back_to_the_checkpoint_and_skip_the_window(make_config):
    roll = ["checkpoint.enabled=true", "checkpoint.every_steps=2", "resilience.nonfinite=rollback"]
    roll += ["resilience.rollback_after=2", "trainer.max_steps=8"]
    out, t = _run(make_config, "roll", *roll, "resilience.inject_nan_steps=[5,6]")
    # steps 1-5 on data 0-4, data 5 and 6 skipped -> back to the step-4 checkpoint; data 4-6 never
    # count again and the loader continues at data step 7
    ref_out, ref = _run(make_config, "roll_ref", *roll, drop=(4, 3))
    assert out["status"] == "FINISHED" and out["step"] == 8
    assert [h["loss"] for h in out["history"]] == [h["loss"] for h in ref_out["history"]]
    log = [json.loads(x) for x in (Path(out["run_dir"]) / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 9))
    _assert_bitwise(
        _state(t.engine.model, t.engine.optimizer), _state(ref.engine.model, ref.engine.optimizer)
    )
    kinds = [(e["step"], e["kind"], e["action"]) for e in _events(out)]
    assert kinds == [(5, "nonfinite", "rollback"), (5, "nonfinite", "rollback"), (5, "rollback", "rollback")]
    rb = _events(out)[-1]["details"]
    assert (rb["from_step"], rb["to_step"], rb["skipped_samples"]) == (5, 4, 3 * 16)


def test_stop_ends_the_run_with_the_reason(make_config):
    from llmtrain.resilience import ResilienceStop

    with pytest.raises(ResilienceStop, match=r"resilience.nonfinite=stop: nonfinite at step 2"):
        _run(
            make_config,
            "stop",
            "trainer.max_steps=4",
            "resilience.nonfinite=stop",
            "resilience.inject_nan_steps=[2]",
        )


def test_config_names_the_key(make_config):
    with pytest.raises(
        ConfigError, match=r"resilience.spike='sometimes' is not allowed; choose one of: warn"
    ):
        make_config("resilience.spike=sometimes")
    with pytest.raises(ConfigError, match=r"resilience.nonfinite: rollback .* checkpoint.enabled=true"):
        make_config("resilience.nonfinite=rollback", "checkpoint.enabled=false")


def test_skip_on_an_engine_that_cannot_skip_is_refused_naming_the_keys(make_config):
    """Every built-in engine skips; one that could not would apply a NaN step and train on, so `skip`
    is refused at start while rollback and stop (which act after the step) are allowed."""
    from llmtrain.resilience.guard import refuse_skip

    cfg = make_config("resilience.spike=skip")
    with pytest.raises(
        ConfigError,
        match=r"resilience.nonfinite=skip and resilience.spike=skip: "
        r"parallel.backend=x cannot skip .* choose one of: warn, rollback, stop",
    ):
        refuse_skip(cfg.resilience, "x")
    refuse_skip(make_config("resilience.nonfinite=stop", "resilience.spike=warn").resilience, "x")


def test_skipped_moe_step_leaves_router_bias_and_statistics_alone():
    """The skipped step's expert loads reach neither the next bias update nor the interval statistics."""
    from llmtrain.models.moe import moe_stats
    from tests.models.test_moe import _batches as moe_batches
    from tests.models.test_moe import tiny_model

    ctx = StepContext(dp_size=1, dp_group=None, grad_clip=0.0, skip_when=lambda loss, _n: math.isnan(loss))
    runs = []
    for skip in (False, True):
        model = tiny_model(moe_bias_update_rate=0.01)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, opt, moe_batches([4]), ctx)
        if skip:
            with scaled_outputs([model], math.nan):
                assert train_step(model, opt, moe_batches([1, 3]), ctx).skipped
        train_step(model, opt, moe_batches([2, 2])[::-1], ctx)
        runs.append(({k: v.clone() for k, v in model.state_dict().items()}, moe_stats(model)))
    (ref_state, ref_stats), (state, stats) = runs
    assert stats == ref_stats
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), k
