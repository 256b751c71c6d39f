"""Pipeline parallelism with `torch.distributed.pipelining`: stage split and schedules.

The model is split by layer count into `pp * virtual` stages (virtual > 1 only for interleaved 1F1B).
Pipeline rank r holds the stages r, r + pp, r + 2*pp, ... ("looped" placement, what the
interleaved schedule expects). The first stage keeps the embedding, the last the final norm and
output projection; give `pp_layers_per_stage` explicitly to put fewer blocks on those two stages
when the vocabulary is large (their extra cost is about one block each at vocab ~ 4 x dim^2/dim).

Loss: the schedule calls `loss_fn(output, target)` on the last stage once per micro-batch and backs
each result up separately; the engine passes a loss that is already divided by the *global* token
count (see llmtrain/parallel/step.py), and `scale_grads=False` stops the schedule from dividing again by
the number of micro-batches, so the summed gradients equal the non-pipelined ones.
"""

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from llmtrain.config.errors import ConfigError
from llmtrain.models.llama import Transformer

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def local_stage_ids(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """Global stage indices held by pipeline rank `pp_rank` (looped placement)."""
    return [pp_rank + v * pp for v in range(virtual)]


def split_stage(model: Transformer, stage_id: int, counts: list[int]) -> Transformer:
    """A meta-device copy of `model` keeping only stage `stage_id`'s blocks (names unchanged)."""
    first = sum(counts[:stage_id])
    keep = {str(i) for i in range(first, first + counts[stage_id])}
    stage = copy.deepcopy(model)
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]
    if stage_id != 0:
        stage.tok_embeddings = None
    if stage_id != len(counts) - 1:
        stage.norm = None
        stage.output = None
    return stage


def build_stages(
    modules: list[nn.Module], stage_ids: list[int], num_stages: int, pp_mesh: DeviceMesh, device: torch.device
) -> list[PipelineStage]:
    """Wrap this rank's (already parallelized) stage modules for the schedule."""
    group = pp_mesh.get_group()
    return [PipelineStage(m, sid, num_stages, device, group=group) for m, sid in zip(modules, stage_ids)]


def build_schedule(
    name: str, stages: list[PipelineStage], n_microbatches: int, loss_fn: Callable
) -> ScheduleGPipe | Schedule1F1B | ScheduleInterleaved1F1B:
    """The pipelining schedule `name` over this rank's stages (loss summed, never rescaled)."""
    cls = SCHEDULES[name]
    if cls is ScheduleInterleaved1F1B:
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    assert len(stages) == 1, "config/rules.py refuses virtual stages without interleaved_1f1b"
    return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


class PipelineRunner:
    """One schedule over this rank's stages, with the step's loss scale and loss sum as state.

    The schedule is built once; `run` sets the scale (dp / global tokens) before each step and
    collects the unscaled token-loss sum of the micro-batches this rank's last stage saw (0 on ranks
    without the last stage). Only the last n_microbatches loss calls of a pass count: the first pass
    also calls the loss once more while the schedule infers tensor shapes.
    """

    def __init__(
        self, name: str, stages: list[PipelineStage], n_microbatches: int, loss_fn: Callable
    ) -> None:
        self.loss_fn, self.n_microbatches = loss_fn, n_microbatches
        self.scale = 1.0
        self.losses: list[torch.Tensor] = []
        self.schedule = build_schedule(name, stages, n_microbatches, self._microbatch_loss)

    def _microbatch_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(output, target)
        self.losses.append(loss.detach())
        return loss * self.scale

    def run(
        self, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict, scale: float, train: bool
    ) -> torch.Tensor:
        """One pass of the schedule over the rank's batch (split into n_microbatches along dim 0)."""
        if inputs.shape[0] % self.n_microbatches:
            raise ConfigError(
                f"pipeline batch of {inputs.shape[0]} sequences cannot be split into "
                f"{self.n_microbatches} micro-batches (parallel.pp_microbatches); for validation, make "
                "trainer.val_batches x trainer.micro_batch_size a multiple of it"
            )
        self.scale, self.losses = scale, []
        run = self.schedule.step if train else self.schedule.eval
        run(inputs, target=targets, **kwargs)
        real = self.losses[-self.n_microbatches :] if self.losses else []
        return torch.stack(real).double().sum().cpu() if real else torch.zeros((), dtype=torch.float64)
