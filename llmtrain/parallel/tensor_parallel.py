"""Megatron-style tensor parallelism with DTensor (`parallelize_module`), plus sequence parallel.

Per block: wq/wk/wv and w1/w3 are column-parallel (each rank owns n_heads/tp heads and hidden/tp
MLP columns), wo and w2 row-parallel, so a block needs one all-reduce in forward per sub-layer (or,
with sequence parallel, one all-gather before and one reduce-scatter after it). The embedding is
vocab-parallel (rows split by token id; row-wise style) and the output projection column-parallel
with a local (b, s, vocab/tp) result: the loss is computed by `vocab_parallel_loss_sum` under
`loss_parallel()`, so full logits are never gathered.

Sequence parallel keeps the residual stream and the norms sharded along the sequence (dim 1) between
the tensor-parallel regions. The residual stream is then a *local* tensor of s/tp positions, so the
engine must pass explicit RoPE `positions` (the model derives its RoPE slice from the local length
otherwise).

Mixture-of-experts blocks keep attention tensor-parallel and *replicate* the MoE layer (router,
experts, shared experts) on every tp rank: its input is gathered to the whole sequence (a no-op
without sequence parallel), every rank routes and computes all tokens identically, and each keeps
its own sequence shard of the output. Identical inputs and output gradients on every rank give
identical expert gradients, so no extra reduction is needed, and the per-row router losses see
whole rows, as in one process (tests/parallel/test_moe_parity.py).
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from llmtrain.models.llama import Transformer
from llmtrain.models.moe import MoE


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model` (or a pipeline stage of it) in place over `tp_mesh`.

    Modules that a pipeline stage dropped (None) are skipped; layer names are unchanged, so weight
    init and checkpoints see the same parameter names as the unsharded model.
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=True)
    if top:
        parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        plan: dict[str, object] = {
            # attention(x, rope, mask, causal): only x is laid out; the rest pass through as is
            "attention": PrepareModuleInput(
                input_layouts=(seq, None, None, None), desired_input_layouts=(Replicate(), None, None, None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
        }
        if isinstance(block.feed_forward, MoE):  # replicated over tp (expert-parallel over ep)
            plan["feed_forward"] = moe_tp_style(seq)
        else:
            plan["feed_forward"] = PrepareModuleInput(
                input_layouts=(seq,), desired_input_layouts=(Replicate(),)
            )
            plan["feed_forward.w1"] = ColwiseParallel()
            plan["feed_forward.w3"] = ColwiseParallel()
            plan["feed_forward.w2"] = RowwiseParallel(output_layouts=seq)
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)


def moe_tp_style(seq: Placement) -> PrepareModuleInputOutput:
    """An MoE layer under TP: its weights are not split over tp (each tp rank runs the whole layer
    on the whole sequence, the same tokens and the same weights, so its gradients come out complete
    and identical on every tp rank, and expert parallelism splits the experts instead). The input is
    gathered to the full sequence (backward: a slice of the identical gradient) and the output
    sliced back to the sequence-parallel layout (backward: a gather)."""
    return PrepareModuleInputOutput(
        input_layouts=(seq,),
        desired_input_layouts=(Replicate(),),
        use_local_input=True,
        output_layouts=(Replicate(),),
        desired_output_layouts=(seq,),
        use_local_output=True,
    )


def apply_grad_layout_hooks(model: nn.Module) -> None:
    """Register `_grad_to_param_placement` on every DTensor parameter. Call it after
    materialization: `to_empty` replaces the parameter objects, and their hooks with them."""
    for param in model.parameters():
        if isinstance(param, DTensor):
            param.register_post_accumulate_grad_hook(_grad_to_param_placement)


def _grad_to_param_placement(param: torch.Tensor) -> None:
    """Give the gradient its parameter's layout as soon as it is accumulated.

    DTensor's autograd leaves two gradients in another layout than their parameter: the vocab-parallel
    embedding's comes out Replicate (the full vocab x dim matrix on every rank; slicing it to the
    rank's rows is local, no communication) and the sequence-parallel norms' come out Partial (one
    all-reduce of `dim` floats here, instead of a lazy one inside every optimizer op that reads it).
    Without FSDP this keeps gradient memory at 1/tp; FSDP2 swaps in its own parameters (this hook
    then never fires) and reduces gradients itself.
    """
    grad = param.grad
    if isinstance(grad, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(param.device_mesh, param.placements)


def vocab_parallel_loss_sum(tp_mesh: DeviceMesh, ignore_index: int):
    """Summed token cross-entropy over logits sharded on the vocabulary dim across `tp_mesh`.

    Must run (forward and backward) inside `torch.distributed.tensor.parallel.loss_parallel()`:
    each rank computes its shard's max/sum-exp and the target logit, and only those (b*s)-sized
    partials are all-reduced, never the (b, s, vocab) logits.
    """

    def loss_sum(local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = DTensor.from_local(local_logits, tp_mesh, [Shard(local_logits.ndim - 1)], run_check=False)
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(0, 1), ignore_index=ignore_index, reduction="sum"
        )
        return loss.to_local() if isinstance(loss, DTensor) else loss

    return loss_sum
