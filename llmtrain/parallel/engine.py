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
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.config import Config
from llmtrain.config.errors import ConfigError
from llmtrain.data.loader import Batch
from llmtrain.parallel.dims import ParallelDims
from llmtrain.parallel.step import StepResult

INSTALL_HINT = {
    "deepspeed": "pip install 'llmtrain[deepspeed]'  (or: bash tools/setup.sh deepspeed)",
    "megatron": "pip install 'llmtrain[megatron]'  (or: bash tools/setup.sh megatron)",
}


class Engine(ABC):
    """One rank's view of a parallelized model plus its optimizer."""

    #: model parts held by this rank (one, or several pipeline stages/chunks in stage order); parameter
    #: names are the model's native names under every layout (layers keyed by global index)
    modules: list[nn.Module]
    #: one optimizer over all of `modules` (the native engine builds it over a merged view of the stages)
    optimizer: torch.optim.Optimizer
    #: the `parallel.backend` value; checkpoints record which engine wrote them (checkpoint/engines.py)
    kind: str = "native"

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


def build_engine(cfg: Config, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device) -> Engine:
    """Pick the backend named by parallel.backend; missing optional engines give the install command."""
    backend = cfg.parallel.backend
    if backend == "native":
        from llmtrain.parallel.native import NativeEngine

        return NativeEngine(cfg, dims, mesh, device)
    try:
        if backend == "deepspeed":
            from llmtrain.parallel.backends.deepspeed import DeepSpeedEngine as EngineCls
        else:
            from llmtrain.parallel.backends.megatron import MegatronEngine as EngineCls
    except ImportError as e:
        raise ConfigError(
            f"parallel.backend={backend} needs an optional package that is not installed ({e.name or e}); "
            f"install it with: {INSTALL_HINT[backend]}"
        ) from e
    return EngineCls(cfg, dims, mesh, device)
