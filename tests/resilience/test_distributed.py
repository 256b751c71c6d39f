"""NaN on rank 0 only: the all-reduced loss and the global grad norm carry it, so every rank skips the
same step (DDP; and the pipeline step, where rank 0 is the first stage and never sees the loss)."""

import pytest
import torch

from llmtrain.distributed.env import DistEnv
from llmtrain.train.trainer import Trainer
from tests.distributed import run_distributed
from tests.resilience.test_nonfinite import ADAM, _drop_windows
from tests.train.test_trainer import SMALL

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _body(rank: int, world_size: int, overrides: list[str]) -> dict:
    from llmtrain.distributed.env import detect_env
    from llmtrain.testing import compose_config

    t = Trainer(compose_config(overrides), detect_env())
    out = t.train()
    opt = t.engine.optimizer
    return {
        "losses": [h["loss"] for h in out["history"]],
        "skipped": t.resilience.events.counts["skipped_steps"],
        "adam_steps": sorted({float(s["step"]) for s in opt.state.values()}),
    }


@pytest.mark.parametrize("layout", [[], ["parallel=pp2", "model.n_layers=2"]], ids=["ddp", "pp2"])
def test_nan_on_rank0_is_skipped_on_every_rank(layout, make_config, shakespeare_dir, tmp_path):
    base = [
        *SMALL,
        *ADAM,
        *layout,
        "trainer.max_steps=5",
        f"data.sources.0.path={shakespeare_dir}",
        "tracking=none",
    ]
    ranks = run_distributed(
        _body, 2, args=([*base, f"run.root={tmp_path}", "run.name=d", "resilience.inject_nan_steps=[2]"],)
    )
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1
    assert ranks[0]["adam_steps"] == ranks[1]["adam_steps"] == [5.0]  # 5 optimizer steps, not 6
    if not layout:  # DDP: every rank reports the global loss; equal to one process without that batch
        ref = Trainer(make_config(*base, "run.name=ref"), DistEnv(0, 0, 1, 1))
        _drop_windows(ref, 2, 1)
        want = [h["loss"] for h in ref.train()["history"]]
        assert ranks[0]["losses"] == ranks[1]["losses"]
        assert ranks[0]["losses"] == pytest.approx(want, rel=1e-5)
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)


def test_rollback_on_two_ranks_agrees_and_equals_one_process_without_the_window(
    make_config, shakespeare_dir, tmp_path
):
    """Data steps 3 and 4 NaN on rank 0, rollback_after=2: both ranks reload the step-2 checkpoint (the
    path comes from rank 0) and continue at data step 5, like one process that never saw data 2-4."""
    base = [*SMALL, *ADAM, "trainer.max_steps=5", f"data.sources.0.path={shakespeare_dir}", "tracking=none"]
    base += ["checkpoint.enabled=true", "checkpoint.every_steps=2", "resilience.nonfinite=rollback"]
    base += ["resilience.rollback_after=2"]
    run = [*base, f"run.root={tmp_path}", "run.name=d", "resilience.inject_nan_steps=[3,4]"]
    ranks = run_distributed(_body, 2, args=(run,))
    ref = Trainer(make_config(*base, "run.name=ref"), DistEnv(0, 0, 1, 1))
    _drop_windows(ref, 2, 3)
    want = [h["loss"] for h in ref.train()["history"]]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(want, rel=1e-5)
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 2
    assert ranks[0]["adam_steps"] == ranks[1]["adam_steps"] == [5.0]
