"""Pipeline parallelism with `torch.distributed.pipelining`: stage split and schedules.

The model is split by layer count into `pp * virtual` stages (virtual > 1 for the interleaved and
V-shaped schedules). Pipeline rank r holds the stages r, r + pp, r + 2*pp, ... ("looped" placement,
what interleaved 1F1B and interleaved zero bubble expect), or, under ZBV and DualPipeV, the stages r
and 2*pp - 1 - r ("V" placement: rank 0 holds the first and the last stage, the turn of the V on
rank pp - 1 (stages pp - 1 and pp) needs no send, and each rank's two chunks even out its
activation memory). The zero-bubble schedules split each backward into an input-gradient pass (on
the critical path) and a weight-gradient pass that fills the bubble; PipelineStage does the split.
The first stage keeps the embedding, the last the final norm and output projection; give
`pp_layers_per_stage` explicitly to put fewer blocks on those two stages when the vocabulary is large
(their extra cost is about one block each at vocab ~ 4 x dim^2/dim).

Loss: the schedule calls `loss_fn(output, target)` on the last stage once per micro-batch and backs
each result up separately; the engine passes a loss that is already divided by the *global* token
count (see llmtrain/parallel/step.py), and `scale_grads=False` stops the schedule from dividing again by
the number of micro-batches, so the summed gradients equal the non-pipelined ones. MoE layers back up
their router losses in their own stage (llmtrain.models.moe: `Stage` tells them which micro-batch runs).
"""

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FULL_BACKWARD,
    OVERLAP_F_B,
    RECV_B,
    REDUCE_GRAD,
    SEND_B,
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    _PipelineScheduleRuntime,
)

from llmtrain.config.errors import ConfigError
from llmtrain.models.llama import Transformer
from llmtrain.models.moe import moe_microbatch


class Stage(PipelineStage):
    """A PipelineStage that marks the micro-batch of each forward for the stage's MoE layers, so that
    each attaches the aux term weighted by that micro-batch's rows (a no-op for dense stages)."""

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):  # type: ignore[override]
        with moe_microbatch(self.submod, fwd_chunk_id):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)


SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
V_SCHEDULES = ("zbv", "dualpipev")  # exactly two stages per rank, V placement
BACKWARD_ACTIONS = (FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, SEND_B, RECV_B, REDUCE_GRAD)


def local_stage_ids(pp_rank: int, pp: int, virtual: int, schedule: str = "1f1b") -> list[int]:
    """Global stage indices held by pipeline rank `pp_rank`: V placement (r, 2*pp - 1 - r) for the
    V schedules, looped placement (r, r + pp, ...) otherwise."""
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
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
    return [Stage(m, sid, num_stages, device, group=group) for m, sid in zip(modules, stage_ids)]


def build_schedule(
    name: str, stages: list[PipelineStage], n_microbatches: int, loss_fn: Callable
) -> PipelineScheduleSingle | PipelineScheduleMulti:
    """The pipelining schedule `name` over this rank's stages (loss summed, never rescaled)."""
    cls = SCHEDULES[name]
    if issubclass(cls, PipelineScheduleMulti):
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    assert len(stages) == 1, "config/rules.py refuses virtual stages for single-stage schedules"
    return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


def forward_only_actions(schedule: _PipelineScheduleRuntime) -> dict[int, list]:
    """The schedule's lowered action list (compute + comms) without its backward work, for evaluation.

    torch's `eval()` of the V schedules runs the backward actions as no-ops, and the one between the
    two stages of the middle rank (no send: the V turns there) then fails
    ("can't steal_bwd_input if this stage doesn't have backward"). Dropping the backward compute and
    comms on every rank keeps the forward sends and receives paired in the same order; DualPipeV's
    overlapped forward+backward actions keep their forward half."""
    out: dict[int, list] = {}
    for rank, actions in schedule.pipeline_order_with_comms.items():
        flat = [
            sub
            for a in actions
            for sub in (a.sub_actions or () if a.computation_type == OVERLAP_F_B else (a,))
        ]
        out[rank] = [a for a in flat if a.computation_type not in BACKWARD_ACTIONS]
    return out


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
        self.eval_order = forward_only_actions(self.schedule) if name in V_SCHEDULES else None

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
        if train:
            # return_outputs=False: otherwise the last stage keeps every micro-batch's logits alive
            # to the end of the step to return them merged (m x micro-batch x seq x vocab; the dry
            # run measured it), and the step only needs the losses
            self.schedule.step(inputs, target=targets, return_outputs=False, **kwargs)
        elif self.eval_order is None:
            self.schedule.eval(inputs, target=targets, **kwargs)
        else:
            self._eval_forward_only(inputs, targets, kwargs)
        real = self.losses[-self.n_microbatches :] if self.losses else []
        return torch.stack(real).double().sum().cpu() if real else torch.zeros((), dtype=torch.float64)

    def _eval_forward_only(self, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict) -> None:
        """`schedule.eval` on the forward-only action list (see `forward_only_actions`)."""
        sched = self.schedule
        train_order, sched.pipeline_order_with_comms = sched.pipeline_order_with_comms, self.eval_order
        try:
            sched.eval(inputs, target=targets, **kwargs)
        finally:
            sched.pipeline_order_with_comms = train_order
