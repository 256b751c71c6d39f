"""Per-GPU memory of a training layout, derived from what this code base actually allocates.

Bytes per parameter (parameters stay fp32 under `trainer.precision=bf16`, autocast casts them):
fp32 weights 4, fp32 gradients 4, AdamW moments 8. The native engine runs ZeRO on FSDP2 over the
dp_shard group (llmtrain/parallel/data_parallel.py): the fp32 master weights and AdamW state rest
sharded at every stage; stage 3 also keeps gradients sharded and holds about two unsharded blocks
at a time (in parallel.param_dtype); stages 1 and 2 keep the unsharded parameters from the first
forward to the last backward of a step, stage 2 reduce-scatters gradients per micro-batch and stage
1 accumulates full gradients until the last one. Under pipeline parallelism every stage behaves like
stage 1 with unsharded parameters (torch's schedules defer the reduce-scatter and the resharding to
the last micro-batch; `apply_fsdp(pipelined=True)`). Plain DDP (zero_stage 0, dp > 1, no tp/pp) keeps
gradient buckets as big as the gradients (`gradient_as_bucket_view` is off).

Saved activations per token and block, read off the autograd graph of `llmtrain.models.llama`
(d = dim, q = n_heads * head_dim, f = ffn hidden, h = n_heads; GQA keys/values are saved after
`repeat_interleave`, so they cost q each whatever n_kv_heads is):
- fp32: 4 * (6d + 4q + 4f + h + 2): two norms keep input, 1/rms, normalized x and the weighted
  output (the linear input); SDPA keeps q, k, v, out and the log-sum-exp; SwiGLU keeps w1 x, w3 x,
  silu(w1 x) and the product;
- bf16 autocast: 16d + 8 (fp32 norm region) + 10d (every linear saves its own bf16 cast of its
  input: 3 for q/k/v, 2 for w1/w3) + 8q + 8f + 4h, plus a bf16 copy of the block's weights (the
  autocast cast that backward needs), per micro-batch in flight;
- bf16 parameters (FSDP's param_dtype=bf16): 16d + 8 (the norms still run in fp32) + 6d (the bf16
  block input and the two linear inputs, each shared by q/k/v and w1/w3) + 8q + 8f + 4h, no weight
  copy (measured per block with saved-tensor hooks within 1% at three shapes).
With tensor parallelism the q/f/h terms divide by tp, the norm region only with sequence
parallel; linear inputs stay full size. Checkpointed blocks keep only their fp32 input (4d) and
one block is rebuilt at a time in backward. The loss adds a transient of vocab-sized tensors per
token (logits, their fp32 copy, log-softmax and its gradient) on the last pipeline stage.
Pipeline stages hold the activations of the micro-batches in flight: pp for 1F1B (first stage),
all of them for GPipe. Context parallelism (cp) leaves each rank seq_len / cp tokens, so every
per-token term divides by cp (and ZeRO shards over dp_shard x cp), except that each attention layer
also saves the all-gathered keys and values of the whole sequence (2q per token after the GQA
repeat, plus the gathered 2 kv-head copy; llmtrain/parallel/context_parallel.py).
Validated against measured peak tensor memory: see docs/performance.md.
"""

import math
from dataclasses import dataclass, fields

from llmtrain.models.llama import TransformerArgs
from llmtrain.plan.experts import expert_params_off_rank, moe_param_delta, zero_expert_correction

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(kw_only=True)
class Layout:
    """One parallel layout with its micro-batch; mirrors the parallel.* and trainer.* keys."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    zero_stage: int = 0
    activation_checkpoint: str = "none"
    sequence_parallel: bool = True
    pp_schedule: str = "1f1b"
    pp_microbatches: int | None = None
    pp_virtual_stages: int = 1
    param_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    micro_batch_size: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def fsdp(self) -> bool:
        """The native engine runs every ZeRO stage on FSDP2, over dp_shard x cp (cp ranks shard too)."""
        return self.zero_stage >= 1 and self.dp_shard * self.cp > 1

    @property
    def residual_bytes(self) -> int:
        """Bytes per element of the residual stream (pipeline sends, receive buffers, its gradient)."""
        return 2 if fsdp_casts_params(self.zero_stage, self.dp_shard * self.cp, self.param_dtype) else 4

    def describe(self) -> str:
        parts = [
            f"dp{self.dp_replicate}x{self.dp_shard}",
            f"tp{self.tp}",
            f"pp{self.pp}",
            *([f"ep{self.ep}"] if self.ep > 1 else []),
            *([f"cp{self.cp}"] if self.cp > 1 else []),
            f"z{self.zero_stage}",
        ]
        return " ".join([*parts, f"ac:{self.activation_checkpoint}", f"mbs{self.micro_batch_size}"])


@dataclass(kw_only=True)
class MemoryEstimate:
    """Peak bytes on the most loaded GPU (the first or last pipeline stage), by category."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    loss: float
    buffers: float
    dynamic: float
    """max(activations + loss [+ gradients when accumulating], gradients): the part that peaks."""
    params_local: float
    """Parameters held by that GPU before ZeRO sharding (after tp/pp splitting)."""

    @property
    def total(self) -> float:
        """Peak: what stays allocated (weights, optimizer state, buffers) plus the dynamic peak."""
        return self.weights + self.optimizer + self.buffers + self.dynamic

    def as_gib(self) -> dict[str, float]:
        out = {f.name: getattr(self, f.name) / GIB for f in fields(self) if f.name != "params_local"}
        return {**out, "total": self.total / GIB}


def block_params(args: TransformerArgs) -> tuple[int, int]:
    """(matrix weights, norm weights) of one transformer block."""
    d, hd = args.dim, args.head_dim
    q, kv = args.n_heads * hd, args.kv_heads * hd
    return d * q + 2 * d * kv + q * d + 3 * d * args.hidden_dim, 2 * d


def total_params(args: TransformerArgs) -> int:
    """Unique parameters (a tied output head is counted once), as `count_params` reports."""
    mats, norms = block_params(args)
    head = 0 if args.tie_embeddings else args.vocab_size * args.dim
    moe = moe_param_delta(args)  # MoE layers: router + experts instead of the dense SwiGLU
    return args.n_layers * (mats + norms) + moe + args.vocab_size * args.dim + head + args.dim


def stage_params(args: TransformerArgs, tp: int, pp: int, stage: str, ep: int = 1) -> tuple[float, int]:
    """(parameters on one GPU of a pipeline stage, its block count). `stage` is "first" (holds the
    embedding) or "last" (final norm and head; its own copy of a tied head when pp > 1); with pp = 1
    the one stage holds all. Matrices and the vocabulary split over tp, norms are replicated, routed
    experts over ep (MoE layers spread evenly over the stages)."""
    mats, norms = block_params(args)
    vd = args.vocab_size * args.dim / tp
    layers = math.ceil(args.n_layers / pp)
    blocks = layers * (mats / tp + norms) + moe_param_delta(args) / pp - expert_params_off_rank(args, ep, pp)
    if pp == 1:
        return blocks + vd + (0 if args.tie_embeddings else vd) + args.dim, layers
    return (blocks + vd, layers) if stage == "first" else (blocks + vd + args.dim, layers)


def act_bytes_per_token(
    args: TransformerArgs, precision: str, tp: int, sp: bool, bf16_params: bool = False
) -> float:
    """Saved activation bytes per token of one (not checkpointed) block; see the module docstring.
    `bf16_params`: FSDP casts the parameters to bf16 (`fsdp_casts_params`), so the residual stream
    and the norms' outputs are bf16 and the linears share one input instead of each saving a cast."""
    d, q, f, h = args.dim, args.n_heads * args.head_dim, args.hidden_dim, args.n_heads
    norm_div = tp if (sp and tp > 1) else 1
    if bf16_params:
        return (16 * d + 8) / norm_div + 6 * d + (8 * q + 8 * f + 4 * h) / tp
    if precision == "bf16":
        return (16 * d + 8) / norm_div + 10 * d + (8 * q + 8 * f + 4 * h) / tp
    return 4 * (4 * d + 2) / norm_div + 4 * 2 * d + 4 * (4 * q + 4 * f + h) / tp


def cp_gathered_kv_bytes(args: TransformerArgs, tokens: int, layout: Layout, precision: str) -> float:
    """Extra bytes one attention layer saves under context parallelism: the whole sequence's keys and
    values (repeated to the query heads, what attention keeps) instead of the rank's 1/cp, plus the
    gathered kv-head tensor itself under GQA. 0 without cp."""
    if layout.cp == 1:
        return 0.0
    q, kv = args.n_heads * args.head_dim / layout.tp, args.kv_heads * args.head_dim / layout.tp
    b = DTYPE_BYTES["bf16" if precision == "bf16" else "fp32"]
    # with grouped-query attention the gathered kv-head tensors are kept besides their repeats; with
    # n_kv_heads == n_heads the repeat is the gathered tensor itself (counted once)
    gathered = 2 * kv if args.kv_heads != args.n_heads else 0.0
    return b * tokens * (2 * q * (1 - 1 / layout.cp) + gathered)


def in_flight_microbatches(layout: Layout, stage: str) -> int:
    """Micro-batches whose activations a pipeline stage holds at its peak: one without pipelining,
    all of them under GPipe, pp on the first stage of 1F1B (1 on the last)."""
    if layout.pp == 1:
        return 1
    m = layout.pp_microbatches or 2 * layout.pp
    if layout.pp_schedule == "gpipe":
        return m
    if stage == "last":
        return 1
    if layout.pp_schedule == "interleaved_1f1b":
        v = max(layout.pp_virtual_stages, 1)
        return min(m, math.ceil(layout.pp * (1 + (layout.pp - 1) / (layout.pp * v))))
    return min(m, layout.pp)


def estimate_memory(
    args: TransformerArgs, seq_len: int, layout: Layout, *, precision: str = "bf16", grad_accum: int = 1
) -> MemoryEstimate:
    """Peak per-GPU memory of a training step in steady state (optimizer state already allocated),
    on the most loaded GPU: the first or the last pipeline stage."""
    stages = ("first", "last") if layout.pp > 1 else ("last",)
    ests = [estimate_stage(args, seq_len, layout, precision, grad_accum, stage) for stage in stages]
    return max(ests, key=lambda e: e.total)


def estimate_stage(
    args: TransformerArgs, seq_len: int, layout: Layout, precision: str, grad_accum: int, stage: str
) -> MemoryEstimate:
    """`estimate_memory` for one pipeline stage ("first" or "last"; "last" without pipelining)."""
    p_local, layers = stage_params(args, layout.tp, layout.pp, stage, layout.ep)
    has_loss = stage == "last"
    shard, z, fsdp = layout.dp_shard * layout.cp, layout.zero_stage, layout.fsdp
    # ZeRO shards dense weights over dp_shard, this rank's experts over edp = dp / ep
    p_zero = p_local / shard + zero_expert_correction(args, layout.ep, layout.dp, shard, layout.pp)
    weights = 4 * (p_zero if fsdp else p_local)  # fp32 master weights rest sharded under FSDP2
    # ZeRO-1 accumulates full local gradients until the step's last micro-batch (data_parallel.py);
    # so does every stage under a pipeline schedule, which also keeps the parameters unsharded
    pipelined = fsdp and layout.pp > 1
    full_grads = z == 0 or not fsdp or (z == 1 and grad_accum > 1) or pipelined
    grads = 4 * (p_local if full_grads else p_zero)
    # (the vocab-parallel embedding's gradient, which DTensor returns Replicate, is sliced back to
    # the rank's rows by llmtrain.parallel.tensor_parallel.apply_grad_layout_hooks)
    optimizer = 8 * (p_zero if fsdp else p_local)
    mats, norms = block_params(args)
    layer_local = mats / layout.tp + norms
    buffers = resident_buffers(args, layout, p_local, layer_local, fsdp, pipelined)
    buffers += pipeline_recv_buffers(args, seq_len, layout, grad_accum)
    tokens = layout.micro_batch_size * seq_len / layout.cp  # this rank's tokens (context parallel)
    in_flight = in_flight_microbatches(layout, stage)
    bf16_params = layout.residual_bytes == 2  # FSDP casts the parameters to bf16
    cast_dtype = precision == "bf16" and not bf16_params  # autocast casts fp32 weights
    per_block = block_activation_bytes(args, seq_len, layout, precision, bf16_params)
    ckpt = checkpointed_blocks(layout.activation_checkpoint, layers)
    kept = [in_flight * (4 * args.dim * tokens if c else per_block) for c in ckpt]
    vocab = args.vocab_size / layout.tp
    # logits, log-softmax output, its gradient and the logits gradient (vocab-sized, per token)
    loss = tokens * (vocab * 12 + args.dim * 12) if has_loss else 0.0
    loss += 2 * vocab * args.dim if cast_dtype and has_loss else 0.0
    grad_div = 1 if full_grads else shard
    grad_layer = 4 * layer_local / grad_div
    grad_head = 4 * vocab * args.dim / grad_div if has_loss else 0.0  # allocated first in backward
    # ZeRO-2/3 on FSDP2: the block being back-propagated holds its gradients unsharded (in the
    # parameters' dtype) until its post-backward reduce-scatter; beside them, under any ZeRO stage,
    # FSDP2's reduce-scatter input in reduce_dtype, which exists only in the backward
    param_b = DTYPE_BYTES[layout.param_dtype]
    unsharded_grad = param_b * layer_local if fsdp and z >= 2 and not pipelined else grad_layer
    unsharded_grad += DTYPE_BYTES[layout.reduce_dtype] * layer_local if fsdp else 0.0
    dynamic = backward_sweep(
        kept,
        ckpt,
        per_block,
        loss,
        grad_layer,
        grad_head,
        grads,
        accumulating=grad_accum > 1 or layout.pp > 1,
        flow=2 * layout.residual_bytes * args.dim * tokens,  # residual-stream gradient in and out
        current_grad=unsharded_grad,
    )
    return MemoryEstimate(
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        activations=sum(kept),
        loss=loss,
        buffers=buffers,
        dynamic=dynamic,
        params_local=p_local,
    )


def block_activation_bytes(
    args: TransformerArgs, seq_len: int, layout: Layout, precision: str, bf16_params: bool
) -> float:
    """What one (not checkpointed) block keeps for its backward, per micro-batch: its saved tensors,
    the whole sequence's K/V under context parallelism, and under bf16 autocast over fp32 weights the
    bf16 cast of its weights that backward needs."""
    tokens = layout.micro_batch_size * seq_len / layout.cp
    per_token = act_bytes_per_token(args, precision, layout.tp, layout.sequence_parallel, bf16_params)
    kv = cp_gathered_kv_bytes(args, seq_len * layout.micro_batch_size, layout, precision)
    mats, _ = block_params(args)
    cast = 2 * mats / layout.tp if precision == "bf16" and not bf16_params else 0.0
    return per_token * tokens + kv + cast


def resident_buffers(
    args: TransformerArgs, layout: Layout, p_local: float, layer_local: float, fsdp: bool, pipelined: bool
) -> float:
    """Buffers alive through the step besides activations: the RoPE table, FSDP2's unsharded
    parameters, DDP's gradient buckets (over dp x cp ranks); FSDP2's reduce-scatter input is counted
    in the backward sweep, the only time it exists."""
    z = layout.zero_stage
    buffers = args.max_seq_len * args.head_dim * 4  # RoPE table
    if fsdp and z == 3 and not pipelined:  # two unsharded blocks (current + prefetch)
        buffers += 2 * layer_local * DTYPE_BYTES[layout.param_dtype]
    elif fsdp:  # ZeRO-1/2, pipeline stages: parameters unsharded from the first forward to the last backward
        buffers += p_local * DTYPE_BYTES[layout.param_dtype]
    if z == 0 and layout.dp * layout.cp > 1 and layout.tp == 1 and layout.pp == 1:
        buffers += 4 * p_local  # DDP gradient buckets (tp/pp all-reduce the gradients in place)
    return buffers


def fsdp_casts_params(zero_stage: int, fsdp_shards: int, param_dtype: str) -> bool:
    """Whether the residual stream (and so every pipeline send/receive) is bf16: FSDP2 casts the
    parameters to `param_dtype` when the native engine runs ZeRO on it, i.e. at any stage over more
    than one shard (dp_shard x cp: context-parallel ranks hold shards too); otherwise autocast keeps
    the residual adds in fp32. One rule for the planner and the dry run's static stage shapes."""
    return zero_stage >= 1 and fsdp_shards > 1 and param_dtype == "bf16"


def pipeline_recv_buffers(args: TransformerArgs, seq_len: int, layout: Layout, grad_accum: int) -> float:
    """Receive buffers a pipeline end stage allocates up front, one per micro-batch: the activations
    it receives (last stage) or the gradients of its outputs (first stage), in the residual stream's
    dtype (fp32, bf16 when FSDP casts the parameters), of this rank's tokens (seq / cp), sequence-sharded
    under sequence parallelism."""
    if layout.pp == 1:
        return 0.0
    n_mb = layout.pp_microbatches or grad_accum
    rows = layout.micro_batch_size * grad_accum / n_mb
    sp_div = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    return n_mb * rows * seq_len / layout.cp * args.dim * layout.residual_bytes / sp_div


def checkpointed_blocks(mode: str, layers: int) -> list[bool]:
    """Which blocks activation checkpointing wraps: all (full), every other one from the first
    (selective), as `llmtrain.parallel.parallelize.apply_activation_checkpointing` does."""
    return [mode == "full" or (mode == "selective" and i % 2 == 0) for i in range(layers)]


def backward_sweep(
    kept: list[float],
    ckpt: list[bool],
    rebuilt: float,
    loss: float,
    grad_layer: float,
    grad_head: float,
    grads: float,
    *,
    accumulating: bool,
    flow: float = 0.0,
    current_grad: float | None = None,
) -> float:
    """Peak of activations + gradients over one micro-batch's backward, block by block.

    At the loss every block's saved tensors and the loss transient are alive. Then block i (last
    first) rebuilds its activations (`rebuilt` bytes) if checkpointed, and frees them once its
    gradients exist, so gradients grow while activations shrink. When accumulating (or pipelining)
    the gradients of earlier micro-batches are all alive already; the optimizer step sees the
    gradients alone. `flow` is the residual-stream gradient passed between blocks; `current_grad`
    the gradient of the block in progress (default `grad_layer`; larger when it is still unsharded).
    """
    base = grads if accumulating else 0.0
    peak = max(grads, sum(kept) + loss + base)
    for i in range(len(kept) - 1, -1, -1):
        grown = base if accumulating else grad_head + (len(kept) - 1 - i) * grad_layer
        alive = sum(kept[: i + 1]) + (rebuilt if ckpt[i] else 0.0) + flow
        peak = max(peak, alive + grown + (grad_layer if current_grad is None else current_grad))
    return peak
