"""A rank slowed on purpose (it sleeps in its forward) is named as the straggler with its host, on the
console, in events.jsonl and in MLflow; its step-time split shows the compute, the other rank's the wait."""

import json
import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from llmtrain.resilience.stragglers import name_stragglers
from tests.distributed import run_distributed
from tests.train.test_trainer import SMALL

SLOW_S = 0.25


def test_name_stragglers_compares_compute_with_the_median():
    assert name_stragglers([1.0, 1.1, 1.0, 1.5], 0.2) == ([3], 1.05)
    assert name_stragglers([1.0, 1.19], 0.2) == ([], 1.095)  # 1.19 < 1.095 * 1.2
    assert name_stragglers([2.0, 2.0, 2.0], 0.2)[0] == []


def _body(rank: int, world_size: int, overrides: list[str]) -> dict:
    from llmtrain.distributed.env import detect_env
    from llmtrain.testing import compose_config
    from llmtrain.train.trainer import Trainer

    out = Trainer(compose_config(overrides), detect_env()).train()
    return {"mlflow": out["mlflow"], "run_dir": out["run_dir"]}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_slowed_rank_is_named_with_its_split(shakespeare_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = [*SMALL, "trainer.max_steps=4", f"data.sources.0.path={shakespeare_dir}", "tracking=mlflow"]
    run += [f"run.root={tmp_path}", "run.name=s", "resilience.straggler_every=2"]
    run += ["resilience.inject_slow_rank=1", f"resilience.inject_slow_s={SLOW_S}"]
    ranks = run_distributed(_body, 2, args=(run,))
    events = [json.loads(x) for x in (Path(ranks[0]["run_dir"]) / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["kind"], e["details"]["ranks"], e["details"]["data_step"]) for e in events] == [
        (1, "straggler", [1], 1),
        (3, "straggler", [1], 3),
    ]
    assert all(e["details"]["hosts"] == [socket.gethostname()] for e in events)
    client, run_id = MlflowClient(ranks[0]["mlflow"]["uri"]), ranks[0]["mlflow"]["run_id"]

    def series(name: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run_id, name)]

    # 2 micro-batches per rank (global 16 = 2 ranks x 4 x 2): rank 1 sleeps 2 x SLOW_S per step. Step
    # 1 is DDP's second iteration, whose forward rebuilds the gradient buckets with a broadcast (a
    # collective inside the compute: the fast rank waits there), so the split is checked at step 3.
    for step in (3,):
        c0, c1 = (dict(series(f"straggler/compute_s/rank_{r}"))[step] for r in (0, 1))
        w0, w1 = (dict(series(f"straggler/wait_s/rank_{r}"))[step] for r in (0, 1))
        s0, s1 = (dict(series(f"straggler/step_s/rank_{r}"))[step] for r in (0, 1))
        assert c1 > 2 * SLOW_S and c1 - c0 > 1.5 * SLOW_S  # the slow rank's compute holds the sleep
        assert w0 > 1.5 * SLOW_S and w1 < 0.5 * SLOW_S  # the fast rank waits for it, it does not wait
        assert s0 == pytest.approx(c0 + w0) and s1 == pytest.approx(c1 + w1)
        assert s0 == pytest.approx(s1, abs=0.5 * SLOW_S)  # the sync makes both steps equally long
    assert series("resilience/stragglers") == [(1, 1.0), (3, 2.0)]
