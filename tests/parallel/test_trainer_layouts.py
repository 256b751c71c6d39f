"""The real trainer (loader, checkpoint manager, data state) changes layout mid-run: 2 steps under
pp2, checkpoint, resume under tp2 for 2 more steps; the 4-step trace equals the 1-process run."""

from pathlib import Path

import pytest

from llmtrain.distributed.env import DistEnv
from llmtrain.train.trainer import Trainer
from tests.distributed import run_distributed
from tests.parallel.common import TINY

RUN = [
    *TINY,
    "trainer.val_every=0",
    "trainer.log_every=1",
    "checkpoint.every_steps=2",
    "checkpoint.resume=auto",
]


def _pp2_then_tp2(rank: int, world: int, overrides: list[str]) -> list[dict]:
    from llmtrain.distributed.env import detect_env
    from llmtrain.testing import compose_config

    first = Trainer(compose_config([*overrides, "parallel=pp2", "trainer.max_steps=2"]), detect_env()).train()
    second = Trainer(
        compose_config([*overrides, "parallel=tp2", "trainer.max_steps=4"]), detect_env()
    ).train()
    return first["history"] + second["history"]


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_trainer_resumes_a_pp2_checkpoint_under_tp2(
    make_config, shakespeare_dir: Path, tmp_path: Path
) -> None:
    base = [*RUN, f"data.sources.0.path={shakespeare_dir}"]
    ref = Trainer(make_config(*base, "run.name=single", "trainer.max_steps=4"), DistEnv(0, 0, 1, 1)).train()
    overrides = [*base, f"run.root={tmp_path}", "run.name=switch", "tracking=none"]
    got = run_distributed(_pp2_then_tp2, 2, args=(overrides,), timeout=220)[0]
    assert [h["step"] for h in got] == [1, 2, 3, 4]
    for g, r in zip(got, ref["history"], strict=True):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
