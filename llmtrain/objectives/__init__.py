"""Training objectives: what a run learns from its batches (objective.name in the config).

An `Objective` supplies the run's data loaders, transforms each step's micro-batches before the
engine sees them, and may replace the engine's token loss (`install`). The trainer calls three
things and nothing else:

    objective = build_objective(cfg, engine, dims, mesh, device, dp_rank)
    train_loader, val_loader = objective.build_loaders(micro_batch_size=..., grad_accum=...)
    batches = objective.prepare(batches, step)        # step=None for validation batches
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.config import Config, ConfigError
from llmtrain.data import build_train_loader, build_val_loader
from llmtrain.data.build import check_tokenizer
from llmtrain.data.loader import Batch
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.parallel.dims import ParallelDims

if TYPE_CHECKING:
    from llmtrain.parallel.engine import Engine

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits, targets) -> summed loss over the target tokens (as `llmtrain.parallel.step.token_loss_sum`)."""


class Loader(Protocol):
    """What the trainer and the checkpoint need from a data loader (Arrow or SFT)."""

    consumed: int

    def next_step(self) -> list[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Objective:
    """Causal LM (the default): Arrow loaders, batches unchanged, plain token cross-entropy."""

    name = "causal_lm"

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int) -> None:
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size

    def build_loaders(self, *, micro_batch_size: int, grad_accum: int) -> tuple[Loader, Loader | None]:
        """(train loader, validation loader or None) for this data-parallel rank."""
        d, kw = (
            self.cfg.data,
            {"micro_batch_size": micro_batch_size, "dp_rank": self.dp_rank, "dp_size": self.dp_size},
        )
        check_tokenizer(d, self.cfg.model.vocab_size)
        return build_train_loader(d, grad_accum=grad_accum, **kw), build_val_loader(d, **kw)

    def prepare(self, batches: list[Batch], step: int | None) -> list[Batch]:
        """Transform this rank's micro-batches of `step` (None = validation)."""
        return batches

    def install(self, engine: "Engine") -> None:
        """Hook the objective into the engine (the default keeps the engine's own loss)."""
        return None

    def metrics(self, split: str) -> dict[str, float]:
        """Extra `<split>/...` metrics (split: train or val) the trainer logs next to the loss; every
        rank calls it at the same step (it may all-reduce). The default has none."""
        return {}


class MaskedLM(Objective):
    """BERT-style masking of the Arrow batches (llmtrain.objectives.masked_lm)."""

    name = "masked_lm"

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int) -> None:
        from llmtrain.objectives.masked_lm import MaskedLMTransform

        super().__init__(cfg, dp_rank, dp_size)
        tok = load_tokenizer(cfg.data.tokenizer)
        mcfg = cfg.objective.masked_lm
        mask_id = mcfg.mask_token_id
        if mask_id is None:
            mask_id = getattr(tok, "mask_id", None)
            mask_id = tok.vocab_size if mask_id is None else mask_id
        if mask_id >= cfg.model.vocab_size:
            raise ConfigError(
                f"objective.masked_lm.mask_token_id: the default mask token {mask_id} (first id after the "
                f"tokenizer's {tok.vocab_size}) needs model.vocab_size > {mask_id}, got {cfg.model.vocab_size}"
            )
        self.transform = MaskedLMTransform(
            mcfg,
            seed=cfg.objective.seed,
            mask_token_id=mask_id,
            num_random_tokens=tok.vocab_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            pad_id=tok.pad_id,
        )

    def prepare(self, batches: list[Batch], step: int | None) -> list[Batch]:
        return self.transform(batches, step)


class SupervisedFineTuning(Objective):
    """Packed, loss-masked prompt/response batches from jsonl (llmtrain.objectives.sft_data)."""

    name = "sft"

    def build_loaders(self, *, micro_batch_size: int, grad_accum: int) -> tuple[Loader, Loader | None]:
        from llmtrain.objectives.sft_data import SFTLoader, load_examples

        s, d = self.cfg.objective.sft, self.cfg.data
        tok = load_tokenizer(d.tokenizer)
        if tok.vocab_size > self.cfg.model.vocab_size:
            raise ConfigError(
                f"data.tokenizer={d.tokenizer} has {tok.vocab_size} tokens > model.vocab_size="
                f"{self.cfg.model.vocab_size}"
            )
        kw = {
            "seq_len": d.seq_len,
            "pad_id": tok.pad_id,
            "micro_batch_size": micro_batch_size,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": d.seed,
        }
        train = SFTLoader(
            load_examples(s.train_path, s, tok, d.seq_len), grad_accum=grad_accum, shuffle=d.shuffle, **kw
        )
        val: SFTLoader | None = None
        if s.val_path:
            val_examples = load_examples(s.val_path, s, tok, d.seq_len)
            val = SFTLoader(val_examples, grad_accum=1, shuffle=False, wrap=False, **kw)  # each row once
        return train, val


class Distillation(Objective):
    """Arrow batches, loss mixed with a frozen teacher's soft targets (llmtrain.objectives.distill)."""

    name = "distill"

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, teacher: torch.nn.Module) -> None:
        from llmtrain.objectives.distill import DistillLoss

        super().__init__(cfg, dp_rank, dp_size)
        d = cfg.objective.distill
        self.loss_fn = DistillLoss(teacher, d.temperature, d.alpha)

    def install(self, engine: "Engine") -> None:
        engine.replace_loss(self.loss_fn)
        self.loss_fn.attach(engine.modules[0])
        self.dp_group = getattr(engine, "dp_group", None)

    def metrics(self, split: str) -> dict[str, float]:
        """The student's own cross-entropy, perplexity and KL (the loss mixes CE and KL)."""
        return self.loss_fn.take(split, self.dp_group)


def build_objective(
    cfg: Config,
    engine: "Engine",
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    device: torch.device,
    dp_rank: int,
) -> Objective:
    """The objective named by objective.name, installed on the engine."""
    name = cfg.objective.name
    if name == "masked_lm":
        obj: Objective = MaskedLM(cfg, dp_rank, dims.dp)
    elif name == "sft":
        obj = SupervisedFineTuning(cfg, dp_rank, dims.dp)
    elif name == "distill":
        from llmtrain.objectives.distill import build_teacher

        obj = Distillation(cfg, dp_rank, dims.dp, build_teacher(cfg, dims, mesh, device))
    else:
        obj = Objective(cfg, dp_rank, dims.dp)
    obj.install(engine)
    return obj


__all__ = ["Loader", "LossFn", "Objective", "build_objective"]
