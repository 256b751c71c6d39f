"""Let a pipeline-parallel engine step on torch's fake process group (for the dry run only).

`torch.distributed.pipelining` learns the tensors a stage receives and sends at its first step, in
one of two ways, and neither survives a fake group, whose point-to-point calls return without moving
data: its warm-up vote (an int32 product passed stage to stage) reads 0 on every receiving stage, so
the schedule picks dynamic inference, and dynamic inference exchanges pickled metadata with
`recv_object_list`, which then unpickles an empty buffer. A dry run knows each stage's tensors from the
config, so it hands them to the stages as static metadata and skips the vote (`make_static`).
Activations received through the fake group are uninitialised memory; the values of such a step mean
nothing (the resilience guard may skip its optimizer step), its memory and traffic are what the real
step would use.

The examples mirror what the model's stages exchange (`llmtrain.models.llama.Transformer.forward`
and the TP plan of `llmtrain.parallel.tensor_parallel`): a non-first stage receives the residual
stream (micro-batch, sequence / cp [/ tp under sequence parallelism], dim), in bf16 when FSDP casts the
parameters to bf16 and fp32 otherwise (autocast keeps the residual adds in fp32); the last stage
returns the local vocabulary shard of the logits (micro-batch, sequence, vocab / tp). Activations
require gradients (the schedule derives the gradient buffers it receives from that).
"""

from typing import Any

import torch
from torch.distributed.pipelining._utils import InferenceMode, _StageMeta, extract_tensor_metas
from torch.distributed.pipelining.stage import PipelineStage

from llmtrain.config import Config, batch_geometry
from llmtrain.parallel.dims import ParallelDims
from llmtrain.plan.memory import fsdp_casts_params

__all__ = ["make_static", "stage_io"]


def stage_io(cfg: Config, dims: ParallelDims, stage: PipelineStage, microbatch: int) -> tuple[Any, Any]:
    """(input, output) example tensors of one stage, on the meta device."""
    seq, dim, vocab = cfg.data.seq_len // dims.cp, cfg.model.dim, cfg.model.vocab_size  # this rank's chunks
    p = cfg.parallel
    fsdp_bf16 = fsdp_casts_params(p.zero_stage, dims.dp_shard * dims.cp, p.param_dtype)
    hidden_dtype = torch.bfloat16 if fsdp_bf16 else torch.float32
    logits_dtype = torch.bfloat16 if fsdp_bf16 or cfg.trainer.precision == "bf16" else torch.float32
    local_seq = seq // dims.tp if dims.tp > 1 and p.sequence_parallel else seq
    hidden = torch.empty(microbatch, local_seq, dim, dtype=hidden_dtype, device="meta", requires_grad=True)
    if stage.is_first:
        inputs = torch.empty(microbatch, seq, dtype=torch.long, device="meta")
    else:
        inputs = hidden
    if stage.is_last:
        shape = (microbatch, seq, vocab // dims.tp)
        outputs = torch.empty(shape, dtype=logits_dtype, device="meta", requires_grad=True)
    else:
        outputs = hidden
    return inputs, outputs


def make_static(engine: Any, cfg: Config, dims: ParallelDims) -> None:
    """Give every pipeline stage of `engine` static metadata and make its schedule skip the vote."""
    runner = engine.pipeline
    schedule = runner.schedule
    stages = list(getattr(schedule, "_stages", None) or [schedule._stage])
    microbatch = batch_geometry(cfg, dims.dp) * cfg.trainer.micro_batch_size // runner.n_microbatches
    for stage in stages:
        inputs, outputs = stage_io(cfg, dims, stage, microbatch)
        stage._user_meta = _StageMeta(
            inputs=extract_tensor_metas((inputs,)),
            outputs=extract_tensor_metas((outputs,)),
            input_grads=None,
            output_grads=None,
        )

    def skip_vote(stages: list, has_backward: bool, p2p_done: bool) -> None:
        for stage in stages:
            stage._inference_mode = InferenceMode.STATIC

    schedule._warmup_p2p = skip_vote
