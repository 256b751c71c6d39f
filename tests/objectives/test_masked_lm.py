"""Masked LM: exactly the selected positions carry loss, the 80/10/10 rule holds, masks are
deterministic and independent of the data-parallel split, and attention is bidirectional."""

import json
from pathlib import Path

import pytest
import torch

from llmtrain.config.objective import MaskedLMConfig
from llmtrain.data.loader import IGNORE_INDEX, Batch
from llmtrain.models import build_model
from llmtrain.objectives.masked_lm import MaskedLMTransform, bidirectional_doc_mask
from llmtrain.parallel.step import forward_loss_sum, model_kwargs
from llmtrain.testing import compose_config
from tests.objectives.common import losses, tiny_config, train

MASK_ID, VOCAB = 258, 256


def transform(dp_rank: int = 0, dp_size: int = 1, seed: int = 0, **cfg: float) -> MaskedLMTransform:
    return MaskedLMTransform(
        MaskedLMConfig(**cfg),
        seed=seed,
        mask_token_id=MASK_ID,
        num_random_tokens=VOCAB,
        dp_rank=dp_rank,
        dp_size=dp_size,
        pad_id=257,
    )


def batch(rows: int, seq: int, seed: int = 0) -> Batch:
    tokens = torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return Batch(tokens, torch.roll(tokens, -1, 1))


def test_80_10_10_statistics_and_targets() -> None:
    src = batch(64, 512)
    out = transform()([src], step=3)[0]
    sel = out.targets != IGNORE_INDEX
    n, n_sel = sel.numel(), int(sel.sum())
    assert abs(n_sel / n - 0.15) < 4 * (0.15 * 0.85 / n) ** 0.5  # binomial, 4 sigma
    assert torch.equal(out.targets[sel], src.inputs[sel])  # targets = original tokens at selected positions
    assert torch.equal(out.inputs[~sel], src.inputs[~sel])  # unselected inputs untouched
    masked = (out.inputs == MASK_ID) & sel
    kept = (out.inputs == src.inputs) & sel
    replaced = sel & ~masked & ~kept
    assert not ((out.inputs == MASK_ID) & ~sel).any()
    sd = lambda p: 4 * (p * (1 - p) / n_sel) ** 0.5
    assert abs(masked.sum() / n_sel - 0.8) < sd(0.8)
    # a random replacement equals the original with probability 1/VOCAB and is then counted as kept
    assert abs(replaced.sum() / n_sel - 0.1 * (1 - 1 / VOCAB)) < sd(0.1)
    assert abs(kept.sum() / n_sel - (0.1 + 0.1 / VOCAB)) < sd(0.1)
    assert out.causal is False


def test_pad_tokens_are_never_selected() -> None:
    src = Batch(torch.full((4, 64), 257), torch.full((4, 64), 257))
    assert (transform(mask_prob=1.0)([src], 0)[0].targets == IGNORE_INDEX).all()


def test_masks_are_deterministic_and_independent_of_the_dp_split() -> None:
    # one rank, accumulation 2, micro-batches of 2 rows == two ranks, accumulation 1, micro-batches of 2 rows:
    # global rows 0-1 on rank 0 and 2-3 on rank 1 (the loader's assignment)
    full = batch(4, 64)
    halves = [Batch(full.inputs[i : i + 2], full.targets[i : i + 2]) for i in (0, 2)]
    single = transform()(halves, step=5)
    ranks = [transform(dp_rank=r, dp_size=2)([halves[r]], step=5)[0] for r in (0, 1)]
    for a, b in zip(single, ranks):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    again = transform()(halves, step=5)
    assert torch.equal(again[1].inputs, single[1].inputs)
    other_step = transform()(halves, step=6)
    assert not torch.equal(other_step[0].targets, single[0].targets)
    eval_masks = transform()(halves, step=None)
    assert torch.equal(eval_masks[0].targets, transform()(halves, step=None)[0].targets)


def test_loss_counts_only_selected_positions_with_bidirectional_attention() -> None:
    cfg = compose_config(["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64"])
    model = build_model(cfg.model, device="cpu")
    model.init_weights(0)
    out = transform()([batch(2, 16)], step=0)[0]
    logits = model(out.inputs, causal=False)
    sel = out.targets != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[sel], out.targets[sel], reduction="sum")
    assert forward_loss_sum(model, out).item() == pytest.approx(manual.item(), rel=1e-6)
    assert out.num_tokens == int(sel.sum())
    assert model_kwargs(out) == {"causal": False}
    # bidirectional: the first position's logits depend on a later token
    changed = out.inputs.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    assert not torch.allclose(model(changed, causal=False)[:, 0], logits[:, 0])


def test_document_mask_is_bidirectional_within_documents_only() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = bidirectional_doc_mask(positions)[0, 0]
    expect = torch.zeros(6, 6, dtype=torch.bool)
    expect[:3, :3] = expect[3:5, 3:5] = expect[5:, 5:] = True
    assert torch.equal(mask, expect)


def test_masked_lm_trains_from_config(shakespeare_dir, tmp_path) -> None:
    cfg = tiny_config(
        shakespeare_dir,
        tmp_path,
        "objective=masked_lm",
        "trainer.max_steps=8",
        "optim.lr=5e-3",
        "optim.warmup_steps=0",
        "checkpoint.enabled=false",
    )
    trace = losses(train(cfg))
    assert (
        abs(trace[0] - torch.log(torch.tensor(320.0)).item()) < 0.1
    )  # near-uniform start over the vocabulary
    assert trace[-1] < trace[0] - 0.3


def test_mask_token_must_fit_the_model_vocabulary(shakespeare_dir, tmp_path) -> None:
    from llmtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"objective\.masked_lm\.mask_token_id"):
        train(tiny_config(shakespeare_dir, tmp_path, "objective=masked_lm", "model.vocab_size=258"))


@pytest.fixture(scope="module")
def masked_run(shakespeare_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mlm")
    train(tiny_config(shakespeare_dir, root, "objective=masked_lm", "run.name=enc", "trainer.max_steps=4"))
    return root / "enc"


def test_evaluate_reports_masked_tokens_and_accuracy(masked_run: Path, shakespeare_dir: Path, capsys) -> None:
    """2 micro-batches of 2 x 32 = 128 positions; the count is of the masked ones (~15%), and the
    accuracy is argmax == original token over them, recomputed here from the checkpoint's model."""
    from llmtrain.data.dataset import TokenDataset
    from llmtrain.data.loader import DataLoader
    from llmtrain.distributed.env import DistEnv
    from llmtrain.objectives import MaskedLM
    from llmtrain.objectives.inference import load_checkpoint_engine
    from tools.evaluate import main

    val = shakespeare_dir / "val"
    assert main([str(masked_run), "--data", str(val), "--batches", "2", "--no-log"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded = load_checkpoint_engine(masked_run, DistEnv(0, 0, 1, 1), device="cpu")
    loader = DataLoader(TokenDataset(str(val), 32), micro_batch_size=2, grad_accum=1, shuffle=False)
    raw = [b for _ in range(2) for b in loader.next_step()]
    masked = MaskedLM(loaded.cfg, 0, 1).prepare(raw, None)
    selected = sum(int((b.targets != IGNORE_INDEX).sum()) for b in masked)
    right = 0
    with torch.no_grad():
        for b in masked:
            keep = b.targets != IGNORE_INDEX
            right += int((loaded.model(b.inputs, causal=False).argmax(-1)[keep] == b.targets[keep]).sum())
    assert got["tokens"] == selected and 8 < selected < 40  # not the 128 positions of the window
    assert got["masked_accuracy"] == pytest.approx(right / selected)


def test_export_refuses_a_masked_lm_with_the_reason(masked_run: Path, tmp_path: Path, capsys) -> None:
    from tools.export_hf import main

    assert main([str(masked_run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "objective.name=masked_lm" in err and "bidirectional" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
