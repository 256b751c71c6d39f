"""The engine interface: how the trainer drives a model, whatever the backend.

The trainer owns the loop, the LR schedule, the data and the checkpoint *layout*; an engine owns the
model parts on this rank, the optimizer, the forward/backward/step mechanics of its parallelism, and
the (sharded) serialization of model and optimizer state into a folder the checkpoint manager gives it.
Backends: native (torch DTensor/FSDP2/pipelining; the reference), deepspeed, megatron.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtrain.config.errors import ConfigError
from llmtrain.data.loader import Batch
from llmtrain.parallel.step import LossFn, SkipWhen, StepResult


class ModelTransform:
    """A change to the model that the engine applies at fixed points without knowing what it is (LoRA is
    one: `llmtrain.peft`). The caller that builds the engine hands it over, so engines never import the
    layers above them. This base class is the identity:

        model = transform.apply(build_model(cfg.model))     # on the meta model, before parallelize
        transform.init(model, seed)                         # after materialize + init
        state = transform.checkpoint_keys(model_state)      # what a save holds / a load reads
        weights = transform.export_state(full_state)        # full weights of the plain model
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def init(self, model: nn.Module, seed: int) -> None:
        return None

    def checkpoint_keys(
        self, state: dict[str, torch.Tensor], saved: set[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """The part of a model state dict that a checkpoint holds. `saved`: the parameter names of the
        checkpoint being loaded (None when saving)."""
        return state

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full (unsharded) model state -> weights of the plain model for export."""
        return state


class Engine(ABC):
    """One rank's view of a parallelized model plus its optimizer."""

    #: model parts held by this rank (one, or several pipeline stages/chunks in stage order); parameter
    #: names are the model's native names under every layout (layers keyed by global index)
    modules: list[nn.Module]
    #: one optimizer over all of `modules` (the native engine builds it over a merged view of the stages)
    optimizer: torch.optim.Optimizer
    #: the `parallel.backend` value; checkpoints record which engine wrote them (checkpoint/formats.py)
    kind: str = "native"

    @property
    def loss_fn(self) -> LossFn | None:
        """The pluggable loss in use (see `replace_loss`); None for an engine without one."""
        return None

    def replace_loss(self, loss_fn: LossFn) -> None:
        """Train and evaluate with `loss_fn(logits, targets)` (summed over target tokens) instead of the
        token cross-entropy, on one model part (objectives such as distillation). Engines that cannot
        plug a loss in refuse, naming the setting."""
        raise ConfigError(
            f"this objective needs a pluggable loss on one model part, which parallel.backend={self.kind} "
            "does not offer"
        )

    def set_skip_when(self, skip_when: SkipWhen | None) -> bool:
        """Let `skip_when(loss, grad_norm)` skip optimizer steps (llmtrain.resilience); False: this
        engine's step cannot be skipped (its caller then refuses `skip` and acts after the step). The
        native, DeepSpeed and megatron engines all return True."""
        return False

    @abstractmethod
    def train_step(self, batches: list[Batch], lr: float) -> StepResult:
        """Forward/backward over this rank's micro-batches, clip, optimizer step at `lr`.
        Returns the true global mean token loss and grad norm (identical on every rank).

        Every rank of one data-parallel replica (its tp and pp peers) passes the same batches; a
        pipelined engine concatenates them and re-splits into its own pipeline micro-batches."""

    @abstractmethod
    def evaluate(self, batches: list[Batch]) -> float:
        """Global mean token loss over validation micro-batches (no gradients)."""

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Collective: write model + optimizer state (sharded) into `folder`."""

    @abstractmethod
    def load(self, folder: Path, *, load_optimizer: bool = True) -> None:
        """Collective: read state written by `save`, possibly under another layout."""

    def snapshot(self) -> Callable[[Path, Any], None] | None:
        """For async checkpoints: copy model + optimizer state to host memory now (the only part that
        blocks training) and return `write(folder, process_group)`, which serializes that copy later on
        a background thread. None (the default): the engine cannot split the two, and the checkpoint
        manager stages through `save` into RAM instead."""
        return None

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded model weights under the native parameter names (for export); collective.
        The native engine returns the complete dict on every rank, under every layout (gathered over
        tp/dp shards and over pipeline stages), on the CPU."""
        raise NotImplementedError(f"{type(self).__name__} cannot export full weights")
