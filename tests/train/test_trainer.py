"""The training loop on real data: loss falls, accumulation math is exact, DDP matches one process."""

import json
import math

import pytest
import torch

from llmtrain.data.loader import IGNORE_INDEX, Batch
from llmtrain.distributed.env import DistEnv
from llmtrain.models.llama import Transformer, TransformerArgs
from llmtrain.parallel.step import StepContext, train_step
from llmtrain.train.trainer import Trainer
from tests.distributed import run_distributed

SMALL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=128",
    "data.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_size=16",
    "trainer.log_every=5",
    "trainer.val_every=0",
    "checkpoint.enabled=false",
    "optim.warmup_steps=5",
]


def test_loss_falls_on_the_sample_corpus(make_config):
    cfg = make_config(*SMALL, "trainer.max_steps=40", "optim.lr=3e-3")
    out = Trainer(cfg, DistEnv(0, 0, 1, 1)).train()
    losses = [h["loss"] for h in out["history"]]
    assert len(losses) == 40
    assert losses[0] > math.log(258) * 0.9  # starts near uniform over the byte vocabulary
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses  # clearly learned byte statistics
    log_lines = (cfg_run_dir(cfg) / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in log_lines] == losses


def cfg_run_dir(cfg):
    from pathlib import Path

    return Path(cfg.run.root) / cfg.run.name


def _tiny() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(TransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=40, max_seq_len=32))
    m.init_weights(3)
    return m


def _batches(n: int, mb: int, seq: int = 12) -> list[Batch]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        toks = torch.randint(0, 40, (mb, seq + 1), generator=g)
        tgt = toks[:, 1:].clone()
        tgt[torch.rand(tgt.shape, generator=g) < 0.3] = IGNORE_INDEX  # uneven token counts per micro-batch
        out.append(Batch(toks[:, :-1], tgt))
    return out


def _step(model, batches):
    # SGD: the update is linear in the gradient, so parameters compare the gradients exactly (Adam's
    # m / sqrt(v) would amplify 1e-9 noise in near-zero gradients into visible differences)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = train_step(model, opt, batches, StepContext(dp_size=1, dp_group=None, grad_clip=0.0))
    return res, [p.detach().clone() for p in model.parameters()]


def test_accumulation_is_token_weighted_and_equals_one_big_batch():
    """4 micro-batches of 2 with uneven masked targets == 1 micro-batch of 8 (loss, grads, update)."""
    small = _batches(4, 2)
    big = [Batch(torch.cat([b.inputs for b in small]), torch.cat([b.targets for b in small]))]
    r1, p1 = _step(_tiny(), small)
    r2, p2 = _step(_tiny(), big)
    assert r1.num_tokens == r2.num_tokens
    assert r1.loss == pytest.approx(r2.loss, rel=1e-6)
    assert r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-5)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _ddp_body(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    from llmtrain.distributed.env import detect_env
    from llmtrain.testing import compose_config

    cfg = compose_config(overrides)
    out = Trainer(cfg, detect_env()).train()
    return [h["loss"] for h in out["history"]] + [h["grad_norm"] for h in out["history"]]


@pytest.mark.distributed
def test_ddp_two_ranks_matches_one_process(make_config, shakespeare_dir, tmp_path):
    """Same global batch (16 sequences): 1 rank accumulates 4 x 4, 2 ranks 2 x 4 each.
    Tolerance: fp32 reductions in a different order, 1e-5 relative on loss and grad norm."""
    base = [*SMALL, "trainer.max_steps=6", f"data.sources.0.path={shakespeare_dir}", "tracking=none"]
    single = Trainer(make_config(*base, "run.name=single"), DistEnv(0, 0, 1, 1)).train()
    ref = [h["loss"] for h in single["history"]] + [h["grad_norm"] for h in single["history"]]
    ranks = run_distributed(
        _ddp_body, 2, args=([*base, f"run.root={tmp_path}", "run.name=ddp"],), timeout=240
    )
    assert ranks[0] == ranks[1]  # every rank reports the same global loss
    for got, want in zip(ranks[0], ref):
        assert got == pytest.approx(want, rel=1e-5)
