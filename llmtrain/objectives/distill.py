"""Knowledge distillation: a frozen teacher's temperature-softened distribution guides the student.

Per target token t (the positions that carry the ordinary loss):
    loss_t = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE_t
The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T
changes (Hinton et al. 2015). The function returns the *sum* over target tokens, like
`token_loss_sum`, so `train_step`'s global token weighting and accumulation math hold unchanged.

The teacher is built by the same engine path as the student (same mesh, same data-parallel/ZeRO
layout) from its own checkpoint config, loaded with DCP under that layout, frozen and kept in eval mode.
"""

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.checkpoint.folder import ENGINE_DIR, resolve_checkpoint_path
from llmtrain.checkpoint.state import TrainerState
from llmtrain.config import Config, ConfigError
from llmtrain.config.model import ModelConfig
from llmtrain.config.peft import PeftConfig
from llmtrain.data.loader import IGNORE_INDEX
from llmtrain.parallel.dims import ParallelDims


def distill_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Summed distillation loss over target tokens (see the module docstring); fp32 softmaxes."""
    keep = targets != IGNORE_INDEX
    s, t = student_logits[keep].float(), teacher_logits[keep].float()
    log_ps, log_pt = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")  # sum_t KL(p_teacher || p_student)
    ce = F.cross_entropy(s, targets[keep], reduction="sum")
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

    def attach(self, student: nn.Module) -> None:
        """Record the student's forward inputs (call once, on the module the engine calls)."""

        def record(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self._inputs = (args, kwargs)

        student.register_forward_pre_hook(record, with_kwargs=True)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._inputs is None:
            raise RuntimeError("DistillLoss.attach(student) was not called before the first forward")
        args, kwargs = self._inputs
        with torch.no_grad():
            t_logits = self.teacher(*args, **kwargs)
        return distill_loss_sum(logits, t_logits, targets, self.temperature, self.alpha)


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
    teacher_cfg = dataclasses.replace(cfg, model=model_cfg, peft=PeftConfig())
    engine = build_engine(teacher_cfg, dims, mesh, device)
    engine.load(path / ENGINE_DIR, load_optimizer=False)
    teacher = engine.modules[0]
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher
