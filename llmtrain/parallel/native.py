"""The native engine: torch-only parallelism (DDP, ZeRO-1/2/3 and HSDP on FSDP2, DTensor TP + SP,
pipelining schedules), all composable, saved with DCP under parameter names that do not depend on
the layout (so a checkpoint loads under any other layout)."""

import dataclasses
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

# torch's staging helpers behind dcp.async_save's default stager (private; checked in tests)
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel

from llmtrain.checkpoint.inplace import load_in_place
from llmtrain.checkpoint.weights import saved_model_keys
from llmtrain.config import Config
from llmtrain.data.loader import IGNORE_INDEX, Batch
from llmtrain.distributed.collectives import all_reduce_, gather_objects
from llmtrain.models import build_model
from llmtrain.models.moe import moe_step_discard, moe_step_end, set_moe_microbatches
from llmtrain.optim import build_optimizer, init_optimizer_state
from llmtrain.parallel.context_parallel import shard_batch
from llmtrain.parallel.data_parallel import GradSync
from llmtrain.parallel.dims import ParallelDims
from llmtrain.parallel.engine import Engine, ModelTransform
from llmtrain.parallel.layout import check_layout, pipeline_microbatches
from llmtrain.parallel.parallelize import parallelize
from llmtrain.parallel.pipeline import PipelineRunner, build_stages
from llmtrain.parallel.step import (
    LossFn,
    SkipWhen,
    StepContext,
    StepResult,
    clip_grad_norm,
    evaluate,
    global_tokens,
    model_kwargs,
    skip_optimizer_step,
    token_loss_sum,
    train_step,
)
from llmtrain.parallel.tensor_parallel import vocab_parallel_loss_sum

# flat "state.<param fqn>.<key>" optimizer keys: mergeable across pipeline stages and layouts
SD_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def merge_stages(stages: list[nn.Module]) -> nn.Module:
    """One module whose parameters are those of all local pipeline stages under their native names
    (layers keyed by global index, embedding/norm/output where present): the optimizer and the
    state-dict helpers see a single model."""
    if len(stages) == 1:
        return stages[0]
    view = nn.Module()
    view.layers = nn.ModuleDict({k: v for s in stages for k, v in s.layers.items()})
    for name in ("tok_embeddings", "norm", "output"):
        mods = [getattr(s, name) for s in stages if getattr(s, name) is not None]
        if mods:
            setattr(view, name, mods[0])
    return view


class NativeEngine(Engine):
    """Model built on meta, transformed by `parallelize`, trained by `train_step` (or a pipeline
    schedule), saved with DCP."""

    def __init__(
        self,
        cfg: Config,
        dims: ParallelDims,
        mesh: DeviceMesh | None,
        device: torch.device,
        transform: ModelTransform | None = None,
    ) -> None:
        check_layout(cfg, dims)
        if transform is None and cfg.peft.method != "none":
            raise ValueError(f"peft.method={cfg.peft.method}: pass its transform (llmtrain.peft.build_peft)")
        self.cfg, self.dims, self.device = cfg, dims, device
        self.transform = transform or ModelTransform()
        p = cfg.parallel
        # token counts, loss sums and gradients over dp x cp (a cp rank is a dp rank for the weights)
        self.dp_group = dims.dp_cp_mesh.get_group() if dims.dp_cp > 1 and mesh is not None else None
        self.cp_rank = mesh["cp"].get_local_rank() if dims.cp_enabled and mesh is not None else 0
        self.pp_group = mesh["pp"].get_group() if dims.pp_enabled and mesh is not None else None
        # transforms (LoRA adapters) go onto the meta model, before any parallel transform
        pm = parallelize(
            self.transform.apply(build_model(cfg.model)), dims, p, mesh, device, cfg.trainer.seed
        )
        self.modules = pm.modules
        self.model = merge_stages(pm.modules)
        self.transform.init(self.model, cfg.trainer.seed)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.ctx = self._step_context(pm.grad_sync, mesh)
        self.pipeline: PipelineRunner | None = None
        if dims.pp_enabled:
            assert mesh is not None
            stages = build_stages(self.modules, pm.stage_ids, pm.num_stages, mesh["pp"], device)
            self.pipeline = PipelineRunner(
                p.pp_schedule, stages, pipeline_microbatches(cfg, dims), self.ctx.loss_fn
            )

    def _step_context(self, sync: GradSync, mesh: DeviceMesh | None) -> StepContext:
        """The step's fixed inputs: precision, gradient sync, the loss (vocab-parallel under TP)."""
        cfg, dims = self.cfg, self.dims
        dtype = {"bf16": torch.bfloat16, "fp32": None}[cfg.trainer.precision]
        device_type = self.device.type
        autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else nullcontext
        loss_fn, loss_ctx = token_loss_sum, nullcontext
        if dims.tp_enabled:
            assert mesh is not None
            loss_fn, loss_ctx = vocab_parallel_loss_sum(mesh["tp"], IGNORE_INDEX), loss_parallel
        return StepContext(
            dp_size=dims.dp_cp,
            dp_group=self.dp_group,
            grad_clip=cfg.optim.grad_clip,
            autocast=autocast,
            accumulate=sync.accumulate,
            reduce_grads=sync.reduce,
            loss_fn=loss_fn,
            loss_ctx=loss_ctx,
            explicit_positions=dims.tp_enabled and cfg.parallel.sequence_parallel,
        )

    @property
    def loss_fn(self) -> LossFn | None:
        """None under TP/PP, where the loss cannot be replaced."""
        return None if self.pipeline is not None or self.dims.tp_enabled else self.ctx.loss_fn

    def replace_loss(self, loss_fn: LossFn) -> None:
        if self.pipeline is not None or self.dims.tp_enabled:
            super().replace_loss(loss_fn)  # refuses: the loss needs whole logits on one model part
        self.ctx = dataclasses.replace(self.ctx, loss_fn=loss_fn)

    def set_skip_when(self, skip_when: SkipWhen | None) -> bool:
        self.ctx = dataclasses.replace(self.ctx, skip_when=skip_when)
        return True

    def train_step(self, batches: list[Batch], lr: float) -> StepResult:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batches = self._cp_shard(batches)
        if self.pipeline is not None:
            return self._pipeline_train_step(batches)
        return train_step(self.model, self.optimizer, batches, self.ctx)

    def _cp_shard(self, batches: list[Batch]) -> list[Batch]:
        """Under context parallelism, this rank's two chunks of each (whole, dp-rank) micro-batch."""
        if not self.dims.cp_enabled:
            return batches
        return [shard_batch(b, self.dims.cp, self.cp_rank) for b in batches]

    def _pipeline_pass(self, batches: list[Batch], scale: float, train: bool) -> torch.Tensor:
        """The rank's micro-batches as one batch through the schedule; returns the global loss sum."""
        assert self.pipeline is not None
        whole = Batch(
            *(
                None if batches[0].__dict__[f] is None else torch.cat([b.__dict__[f] for b in batches])
                for f in ("inputs", "targets", "positions", "attn_mask")
            )
        )
        if train:  # MoE layers weight their router losses by these rows (llmtrain.models.moe)
            rows = whole.targets.ne(IGNORE_INDEX).sum(-1).tensor_split(self.pipeline.n_microbatches)
            set_moe_microbatches(self.model, list(rows), scale)
        try:
            with self.ctx.autocast(), self.ctx.loss_ctx():
                loss_sum = self.pipeline.run(
                    whole.inputs,
                    whole.targets,
                    model_kwargs(whole, self.ctx.explicit_positions),
                    scale,
                    train,
                )
        finally:
            set_moe_microbatches(self.model, None)
        # only the last stage saw the loss: sum over the pipeline, then over data-parallel replicas
        all_reduce_(loss_sum, self.pp_group)
        return all_reduce_(loss_sum, self.dp_group)

    def _pipeline_train_step(self, batches: list[Batch]) -> StepResult:
        """Same math as `llmtrain.parallel.step.train_step`, with the schedule doing forward/backward."""
        n_global = global_tokens(batches, self.dp_group)
        loss_sum = self._pipeline_pass(batches, self.dims.dp_cp / max(n_global, 1), train=True)
        if self.ctx.reduce_grads is not None:
            self.ctx.reduce_grads()
        grad_norm = clip_grad_norm(self.modules, self.cfg.optim.grad_clip, self.pp_group)
        loss = float(loss_sum) / max(n_global, 1)
        if skip_optimizer_step(self.optimizer, self.ctx, loss, grad_norm):
            moe_step_discard(self.model)
            return StepResult(loss, grad_norm, n_global, skipped=True)
        self.optimizer.step()
        moe_step_end(self.model, self.dp_group)  # each stage's layers, loads summed over dp
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, n_global)

    def evaluate(self, batches: list[Batch]) -> float:
        batches = self._cp_shard(batches)
        if self.pipeline is None:
            return evaluate(self.model, batches, self.ctx)
        with torch.no_grad():
            loss_sum = self._pipeline_pass(batches, 1.0, train=False)
        return float(loss_sum) / max(global_tokens(batches, self.dp_group), 1)

    def _checkpoint_state(self) -> dict[str, Any]:
        init_optimizer_state(self.optimizer)  # a step-0 save must not take torch's zero-grad step
        msd, osd = get_state_dict(self.model, self.optimizer, options=SD_OPTIONS)
        return {"model": self.transform.checkpoint_keys(msd), "optim": osd}

    def save(self, folder: Path) -> None:
        dcp.save(self._checkpoint_state(), checkpoint_id=str(folder), no_dist=not dist.is_initialized())

    def snapshot(self) -> Callable[[Path, Any], None]:
        """Host copy of the (sharded) state now; DCP serializes the copy later (async checkpoints).
        Uses torch's own staging helpers (the ones behind dcp.async_save's default stager)."""
        state = self._checkpoint_state()
        host = _copy_state_dict(state, _create_cpu_state_dict(state))

        def write(folder: Path, group: Any) -> None:
            dcp.save(host, checkpoint_id=str(folder), process_group=group, no_dist=not dist.is_initialized())

        return write

    def load(self, folder: Path, *, load_optimizer: bool = True) -> None:
        if load_optimizer:
            init_optimizer_state(self.optimizer)  # see llmtrain.optim.init_optimizer_state
            msd, osd = get_state_dict(self.model, self.optimizer, options=SD_OPTIONS)
            state = {"model": self.transform.checkpoint_keys(msd, saved_model_keys(folder)), "optim": osd}
            load_in_place(state, folder, no_dist=not dist.is_initialized())  # into the live tensors
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict={**msd, **state["model"]},
                optim_state_dict=state["optim"],
                options=SD_OPTIONS,
            )
        else:
            msd = get_model_state_dict(self.model, options=SD_OPTIONS)
            state = {"model": self.transform.checkpoint_keys(msd, saved_model_keys(folder))}
            load_in_place(state, folder, no_dist=not dist.is_initialized())
            set_model_state_dict(self.model, {**msd, **state["model"]}, options=SD_OPTIONS)

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Every rank gets the full weights (gathered over tp/dp shards, then over pipeline stages)."""
        opts = StateDictOptions(full_state_dict=True)
        state = {k: v.detach().cpu() for k, v in get_model_state_dict(self.model, options=opts).items()}
        if self.pp_group is not None:
            parts = gather_objects(state, self.pp_group)
            state = {k: v for part in parts if part for k, v in part.items()}
        return self.transform.export_state(state)  # LoRA: adapters merged into the base weights
