"""The native engine: torch-only parallelism (DDP now; TP/PP/ZeRO via `parallelize`)."""

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.config import Config
from llmtrain.data.loader import Batch
from llmtrain.models import build_model
from llmtrain.parallel.dims import ParallelDims
from llmtrain.parallel.engine import Engine
from llmtrain.parallel.parallelize import parallelize
from llmtrain.train.optim import build_optimizer
from llmtrain.train.step import StepResult, evaluate, train_step


class NativeEngine(Engine):
    """Model built on meta, transformed by `parallelize`, trained by `train_step`, saved with DCP."""

    def __init__(self, cfg: Config, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device) -> None:
        self.cfg, self.dims, self.device = cfg, dims, device
        self.dp_group = mesh["dp"].get_group() if dims.dp_enabled and mesh is not None else None
        pm = parallelize(build_model(cfg.model), dims, cfg.parallel, mesh, device, cfg.trainer.seed)
        self.model = pm.module
        self.modules = [self.model]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        dtype = {"bf16": torch.bfloat16, "fp32": None}[cfg.trainer.precision]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        self.no_sync = getattr(self.model, "no_sync", nullcontext)

    def train_step(self, batches: list[Batch], lr: float) -> StepResult:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return train_step(self.model, self.optimizer, batches, dp_size=self.dims.dp, dp_group=self.dp_group,
                          grad_clip=self.cfg.optim.grad_clip, autocast=self.autocast, no_sync=self.no_sync)

    def evaluate(self, batches: list[Batch]) -> float:
        return evaluate(self.model, batches, self.dp_group, self.autocast)

    def save(self, folder: Path) -> None:
        msd, osd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))

    def load(self, folder: Path, *, load_optimizer: bool = True) -> None:
        if load_optimizer:
            msd, osd = get_state_dict(self.model, self.optimizer)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=str(folder))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        else:
            state = {"model": get_model_state_dict(self.model)}
            dcp.load(state, checkpoint_id=str(folder))
            set_model_state_dict(self.model, state["model"])

    def full_model_state(self) -> dict[str, torch.Tensor]:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=opts)
