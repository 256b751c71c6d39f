"""Knowledge distillation: a frozen teacher's temperature-softened distribution guides the student.

Per target token t (the positions that carry the ordinary loss):
    loss_t = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE_t
The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T
changes (Hinton et al. 2015). The function returns the *sum* over target tokens, like
`token_loss_sum`, so `train_step`'s global token weighting and accumulation math hold unchanged.

`train/loss` and `val/loss` are that mixed loss, which is not a cross-entropy: at alpha=0.5 its exp()
is far below the student's real perplexity. `DistillLoss` therefore also sums the two terms apart
(per split: the student's forward in train or eval mode), and the run logs them per token as
`train|val/ce`, `train|val/ppl` (exp of the CE: comparable with any causal-LM run) and
`train|val/kl` (the KL at temperature T, without the alpha T^2 weight); train values are averaged
over the log interval.

The teacher is built by the same engine path as the student (same mesh, same data-parallel/ZeRO
layout) from its own checkpoint config, loaded with DCP under that layout, frozen and kept in eval mode.
"""

import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.checkpoint.folder import ENGINE_DIR, resolve_checkpoint_path
from llmtrain.checkpoint.state import TrainerState
from llmtrain.config import Config, ConfigError
from llmtrain.config.model import ModelConfig
from llmtrain.config.peft import PeftConfig
from llmtrain.data.loader import IGNORE_INDEX
from llmtrain.distributed.collectives import all_reduce_
from llmtrain.parallel.dims import ParallelDims

log = logging.getLogger("llmtrain")


def distill_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL sum at temperature T, cross-entropy sum) over the target tokens; fp32 softmaxes."""
    keep = targets != IGNORE_INDEX
    s, t = student_logits[keep].float(), teacher_logits[keep].float()
    log_ps, log_pt = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")  # sum_t KL(p_teacher || p_student)
    return kl, F.cross_entropy(s, targets[keep], reduction="sum")


def distill_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Summed distillation loss over target tokens (see the module docstring); fp32 softmaxes."""
    kl, ce = distill_terms(student_logits, teacher_logits, targets, temperature)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


class DistillLoss:
    """The engine's pluggable `loss_fn(logits, targets)`, running the frozen teacher on the same inputs.

    `train_step` hands a loss function only (logits, targets); the teacher needs the model inputs too
    (tokens, positions, attention mask, causal flag). A forward pre-hook on the student records the
    inputs of its latest forward, which is the one whose logits reach this loss (one micro-batch at a
    time), so the teacher sees exactly what the student saw.
    """

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float) -> None:
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
        self._inputs: tuple[tuple, dict] | None = None
        self._split = "train"
        self.sums = {split: torch.zeros(3, dtype=torch.float64) for split in ("train", "val")}
        """Per split: (CE sum, KL sum, target tokens) since the last `take`."""

    def attach(self, student: nn.Module) -> None:
        """Record the student's forward inputs (call once, on the module the engine calls)."""

        def record(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self._inputs = (args, kwargs)
            self._split = "train" if mod.training else "val"  # evaluate() puts the student in eval

        student.register_forward_pre_hook(record, with_kwargs=True)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._inputs is None:
            raise RuntimeError("DistillLoss.attach(student) was not called before the first forward")
        args, kwargs = self._inputs
        with torch.no_grad():
            t_logits = self.teacher(*args, **kwargs)
        kl, ce = distill_terms(logits, t_logits, targets, self.temperature)
        n = (targets != IGNORE_INDEX).sum()
        self.sums[self._split] += torch.stack([ce.detach(), kl.detach(), n]).double().cpu()
        return self.alpha * self.temperature**2 * kl + (1 - self.alpha) * ce

    def take(self, split: str, group: dist.ProcessGroup | None) -> dict[str, float]:
        """Per-token CE, its perplexity and KL of `split` over all data-parallel ranks since the
        last call (every rank calls it at the same step); resets the sums."""
        totals, self.sums[split] = self.sums[split], torch.zeros(3, dtype=torch.float64)
        all_reduce_(totals, group)
        if totals[2] == 0:
            return {}
        ce, kl = float(totals[0] / totals[2]), float(totals[1] / totals[2])
        return {f"{split}/ce": ce, f"{split}/ppl": math.exp(min(ce, 80.0)), f"{split}/kl": kl}


def teacher_checkpoint(cfg: Config) -> tuple[Path, ModelConfig]:
    """The teacher's checkpoint folder and model config, checked usable for this student: it exists and
    is complete, and it shares the student's tokenizer and vocabulary (also run by the launcher)."""
    path = resolve_checkpoint_path(cfg.objective.distill.teacher, key="objective.distill.teacher")
    model_cfg, tokenizer = TrainerState.read(path).model_and_tokenizer(path)
    if (tokenizer not in (None, cfg.data.tokenizer)) or model_cfg.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"objective.distill.teacher={path}: teacher tokenizer/vocabulary ({tokenizer}, "
            f"{model_cfg.vocab_size}) differ from the student's data.tokenizer={cfg.data.tokenizer}, "
            f"model.vocab_size={cfg.model.vocab_size}; distillation needs the same tokenizer"
        )
    return path, model_cfg


def build_teacher(
    cfg: Config, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device
) -> nn.Module:
    """Build the teacher with the student's engine and layout, load its weights, freeze it."""
    from llmtrain.parallel.build import build_engine

    path, model_cfg = teacher_checkpoint(cfg)
    if dims.world_size == 1 or dist.get_rank() == 0:
        log.info("distillation teacher: %s", path.resolve())
    teacher_cfg = dataclasses.replace(cfg, model=model_cfg, peft=PeftConfig())
    engine = build_engine(teacher_cfg, dims, mesh, device)
    engine.load(path / ENGINE_DIR, load_optimizer=False)
    teacher = engine.modules[0]
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher
