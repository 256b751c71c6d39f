"""Distillation: the KL term against an explicit formula, zero KL for teacher = student at T=1,
only the student learns, and the objective runs from a config with a teacher checkpoint."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmtrain.data.loader import IGNORE_INDEX
from llmtrain.objectives.distill import distill_loss_sum
from tests.objectives.common import losses, tiny_config, train


def test_kl_term_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, :2] = IGNORE_INDEX
    keep = targets != IGNORE_INDEX
    temp = 2.0
    p_t, log_p_t, log_p_s = F.softmax(t / temp, -1), F.log_softmax(t / temp, -1), F.log_softmax(s / temp, -1)
    kl = (p_t * (log_p_t - log_p_s)).sum(-1)[keep].sum()
    ce = F.cross_entropy(s[keep], targets[keep], reduction="sum")
    got = distill_loss_sum(s, t, targets, temp, alpha=0.3)
    assert got.item() == pytest.approx((0.3 * temp**2 * kl + 0.7 * ce).item(), rel=1e-6)
    assert distill_loss_sum(s, t, targets, temp, alpha=0.0).item() == pytest.approx(ce.item(), rel=1e-6)


def test_teacher_equal_to_student_at_t1_gives_zero_kl() -> None:
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    assert distill_loss_sum(logits, logits.clone(), targets, 1.0, alpha=1.0).item() == 0.0


def test_distill_run_from_config_teacher_is_frozen(shakespeare_dir, tmp_path, pretrained_run) -> None:
    """Student initialised from the teacher, T=1, alpha=1: the first step's loss is exactly 0 (KL of a
    model with itself) and stays ~0 after updates of a zero gradient; with alpha=0 the loss is the
    teacher's own cross-entropy, which the student then reduces while the teacher stays fixed."""
    common = [
        f"objective.distill.teacher={pretrained_run}",
        f"checkpoint.init_from={pretrained_run}",
        "objective=distill",
        "trainer.max_steps=3",
        "checkpoint.enabled=false",
    ]
    zero = losses(
        train(
            tiny_config(
                shakespeare_dir,
                tmp_path,
                "run.name=kl0",
                *common,
                "objective.distill.temperature=1.0",
                "objective.distill.alpha=1.0",
            )
        )
    )
    assert zero[0] == 0.0 and max(zero) < 1e-6
    from llmtrain.distributed.env import DistEnv
    from llmtrain.train.trainer import Trainer

    trainer = Trainer(
        tiny_config(
            shakespeare_dir,
            tmp_path,
            "run.name=ce",
            *common,
            "objective.distill.alpha=0.0",
            "trainer.max_steps=4",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
        ),
        DistEnv(0, 0, 1, 1),
    )
    teacher = trainer.engine.ctx.loss_fn.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ce = losses(trainer.train())
    plain = losses(
        train(
            tiny_config(
                shakespeare_dir,
                tmp_path,
                "run.name=plain",
                f"checkpoint.init_from={pretrained_run}",
                "trainer.max_steps=4",
                "optim.lr=1e-2",
                "optim.warmup_steps=0",
                "checkpoint.enabled=false",
            )
        )
    )
    assert ce == pytest.approx(plain, rel=1e-6)  # alpha=0 is plain causal LM
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_with_another_vocabulary_is_refused(shakespeare_dir, tmp_path, pretrained_run) -> None:
    from llmtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"objective\.distill\.teacher"):
        train(
            tiny_config(
                shakespeare_dir,
                tmp_path,
                "objective=distill",
                f"objective.distill.teacher={pretrained_run}",
                "model.vocab_size=300",
            )
        )


def test_distill_logs_the_students_ce_and_kl_apart_from_the_mixed_loss(
    shakespeare_dir, tmp_path, pretrained_run, caplog
) -> None:
    """val/ce, val/ppl and val/kl equal a hand computation on the same batches with the student and
    the teacher; val/loss is the mix 0.5 * T^2 * kl + 0.5 * ce, and val/ppl is exp(ce), not exp(loss)."""
    from llmtrain.distributed.env import DistEnv
    from llmtrain.train.trainer import Trainer

    cfg = tiny_config(
        shakespeare_dir,
        tmp_path,
        "run.name=dl",
        "objective=distill",
        f"objective.distill.teacher={pretrained_run}",
        "objective.distill.temperature=2.0",
        "objective.distill.alpha=0.5",
        "trainer.max_steps=2",
        "trainer.log_every=1",
        "checkpoint.enabled=false",
    )
    torch.set_num_threads(1)
    with caplog.at_level("INFO", logger="llmtrain"):
        trainer = Trainer(cfg, DistEnv(0, 0, 1, 1))
        trainer.train()
    assert f"distillation teacher: {(pretrained_run / 'checkpoints').resolve()}" in caplog.text
    assert "validation at step 2: loss" in caplog.text and "| ce " in caplog.text and "| kl " in caplog.text
    trainer.val_loader.consumed = 0
    batches = [b for _ in range(cfg.trainer.val_batches) for b in trainer.val_loader.next_step()]
    loss = trainer.engine.evaluate(batches)
    got = trainer.objective.metrics("val")
    student, teacher = trainer.engine.modules[0], trainer.objective.loss_fn.teacher
    ce = kl = n = 0.0
    with torch.no_grad():
        for b in batches:
            s, t, y = student(b.inputs), teacher(b.inputs), b.targets
            ce += F.cross_entropy(s.flatten(0, 1), y.flatten(), reduction="sum").item()
            p_t = F.softmax(t / 2, -1)
            kl += (p_t * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum().item()
            n += y.numel()
    assert got["val/ce"] == pytest.approx(ce / n, rel=1e-5)
    assert got["val/kl"] == pytest.approx(kl / n, rel=1e-4)
    assert got["val/ppl"] == pytest.approx(math.exp(ce / n), rel=1e-5)
    assert loss == pytest.approx(0.5 * 4 * kl / n + 0.5 * ce / n, rel=1e-4)
    assert got["val/ppl"] > 2 * math.exp(loss)  # the mixed loss's exp() flatters the student
