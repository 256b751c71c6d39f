"""LR schedules and weight-decay groups."""

import itertools

import pytest
import torch

from llmtrain.config.optim import OptimConfig
from llmtrain.models.llama import Transformer, TransformerArgs
from llmtrain.optim import build_optimizer, lr_factor, param_groups


def _cfg(**kw) -> OptimConfig:
    return OptimConfig(**{"warmup_steps": 10, "min_lr_ratio": 0.1, **kw})


def test_warmup_is_linear_and_reaches_peak():
    c = _cfg(schedule="cosine")
    f = [lr_factor(s, c, 100) for s in range(11)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11) and f[10] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(f))


def test_cosine_ends_at_floor_and_is_monotone():
    c = _cfg(schedule="cosine")
    f = [lr_factor(s, c, 100) for s in range(10, 101)]
    assert f[-1] == pytest.approx(0.1) and all(a >= b for a, b in itertools.pairwise(f))
    assert lr_factor(55, c, 100) == pytest.approx(0.55)  # midpoint of the cosine: (1 + 0.1) / 2


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    c = _cfg(schedule="wsd", decay_fraction=0.2)
    assert lr_factor(50, c, 100) == 1.0 and lr_factor(80, c, 100) == 1.0
    assert lr_factor(90, c, 100) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(100, c, 100) == pytest.approx(0.1)


def test_constant_and_linear():
    assert lr_factor(70, _cfg(schedule="constant"), 100) == 1.0
    assert lr_factor(100, _cfg(schedule="linear"), 100) == pytest.approx(0.1)


def test_weight_decay_only_on_projection_matrices():
    m = Transformer(TransformerArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, tie_embeddings=True))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.ndim == 2 and "tok_embeddings" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_embeddings.weight", "norm.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    opt = build_optimizer(m, OptimConfig(weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[1]["weight_decay"] == 0.0
