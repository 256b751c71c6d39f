"""Communication per optimizer step, for the planner's time model.

Bytes are what one rank sends in a ring collective (NCCL's "bus bandwidth" convention: an all-reduce
of S bytes over n ranks sends 2 (n-1)/n S, an all-gather or reduce-scatter (n-1)/n S), so time =
bytes / bus bandwidth. The formulas are the ones `bench/comm_volume.py` checks against the bytes the
native engine really sends (dp, ZeRO-1/2 and pp exactly; ZeRO-3 sends a little less because the
last block is not re-gathered for its backward; tp a little more: loss and norm-gradient sums are
left out here; docs/benchmarks.md has the measured ratios).

Per step, with P parameters per (tp, pp) shard, m micro-batches, n = dp_shard, r = dp_replicate:
  ZeRO-0/1 (DDP)   all-reduce of the gradients once:          2 (dp-1)/dp P g
  ZeRO-2           reduce-scatter per micro-batch + gather:   m (n-1)/n P g + (n-1)/n P a
  ZeRO-3 (FSDP)    gather fwd + gather bwd + reduce-scatter:  m (n-1)/n P (2a + g)
  ZeRO-2/3 with pp one gather + one reduce-scatter per step:  (n-1)/n P (a + g) (a stage stays
                   unsharded from its first backward to its last; see parallel/data_parallel.py)
  HSDP             ZeRO-3 in the shard group + all-reduce of the shard across replicas: 2 (r-1)/r P/n g
  tp               4 collectives per layer per micro-batch (2 fwd, 2 bwd; all-reduce, or all-gather +
                   reduce-scatter under sequence parallel: the same bytes), 2 more with full recompute,
                   2 for the vocab-parallel embedding and output, each 2 (t-1)/t A, A = micro-batch
                   activations (mbs x seq x dim)
  pp               per micro-batch an activation forward and a gradient backward over each boundary:
                   a middle stage sends both, an end stage one (the busiest rank is counted)
  ep               token dispatch + combine all-to-alls of every MoE layer (llmtrain/plan/experts.py);
                   the dp terms count only this rank's E/ep routed experts
  cp               per layer per micro-batch one all-gather of K and V (forward; again in a full
                   recompute) and one reduce-scatter of their gradients: (c-1)/c K each, K = mbs x seq
                   x 2 kv_heads x head_dim / tp in the compute dtype; the weight-gradient all-reduce
                   of ZeRO-0 runs over dp x cp ranks, and ZeRO shards over n = dp_shard x cp
g = gradient reduce bytes (parallel.reduce_dtype under ZeRO/FSDP2: bf16 2, fp32 4; DDP reduces its
fp32 gradients: 4), a = parameter bytes (bf16 params: 2, else 4), activations in the compute dtype.
Which links a group uses follows the mesh order (pp, dp_replicate, dp_shard, cp, tp; tp innermost): a
group whose ranks lie in one node uses the intra-node bandwidth, else inter-node.
"""

from dataclasses import dataclass

from llmtrain.models.llama import TransformerArgs
from llmtrain.plan.experts import dispatch_bytes, expert_params_off_rank
from llmtrain.plan.memory import DTYPE_BYTES, Layout, total_params


@dataclass(kw_only=True)
class CommPart:
    """One kind of traffic: bytes a rank sends per step, and whether its group crosses nodes."""

    bytes: float
    inter_node: bool
    overlapped: bool
    """Data-parallel traffic can hide behind the backward; tp and pp traffic sits on the critical path."""


def _inter_node(extent: int, gpus_per_node: int) -> bool:
    """A group spanning `extent` consecutive ranks stays inside a node when it fits one evenly."""
    return extent > gpus_per_node or gpus_per_node % extent != 0


def _dp_parts(
    lo: Layout, shard_params: float, m: int, g: float, a: float, gpus_per_node: int
) -> dict[str, CommPart]:
    """Data-parallel traffic (dp, and dp_replicate under HSDP) of `comm_volume`."""
    n, r, t = lo.dp_shard * lo.cp, lo.dp_replicate, lo.tp  # FSDP over dp_shard x cp
    parts: dict[str, CommPart] = {}
    if lo.zero_stage <= 1:  # one all-reduce over every data-parallel (and context-parallel) rank
        ranks = lo.dp * lo.cp
        parts["dp"] = CommPart(
            bytes=2 * (ranks - 1) / ranks * shard_params * g,
            inter_node=_inter_node(ranks * t, gpus_per_node),
            overlapped=True,
        )
    else:
        per = (m * g + a) if lo.zero_stage == 2 else m * (2 * a + g)
        if lo.pp > 1:  # a pipeline stage gathers once and reduce-scatters once per step
            per = a + g
        if n > 1:
            parts["dp"] = CommPart(
                bytes=per * (n - 1) / n * shard_params,
                inter_node=_inter_node(n * t, gpus_per_node),
                overlapped=True,
            )
        if r > 1:  # HSDP: the gradient shards are all-reduced across replicas
            parts["dp_replicate"] = CommPart(
                bytes=2 * (r - 1) / r * shard_params / n * g,
                inter_node=_inter_node(r * n * t, gpus_per_node),
                overlapped=True,
            )
    return parts


def comm_volume(
    args: TransformerArgs,
    seq_len: int,
    layout: Layout,
    grad_accum: int,
    gpus_per_node: int,
    precision: str = "bf16",
) -> dict[str, CommPart]:
    """Bytes per rank per step for `layout` by kind (dp, dp_replicate, tp, pp; see the module doc)."""
    lo = layout
    # routed experts: each rank reduces only its E/ep (over edp; counted like dp, slightly more)
    shard_params = total_params(args) / (lo.tp * lo.pp) - expert_params_off_rank(args, lo.ep, lo.pp)
    g = float(DTYPE_BYTES[lo.reduce_dtype]) if lo.fsdp else 4.0  # FSDP2's reduce_dtype; DDP reduces fp32
    a = 2.0 if lo.param_dtype == "bf16" else 4.0
    act_bytes = 2.0 if precision == "bf16" else 4.0
    m, t = grad_accum, lo.tp
    parts: dict[str, CommPart] = {}

    if lo.dp * lo.cp > 1:
        parts.update(_dp_parts(lo, shard_params, m, g, a, gpus_per_node))

    if t > 1:
        act = lo.micro_batch_size * seq_len * args.dim * act_bytes
        per_layer = 6 if lo.activation_checkpoint == "full" else 4
        collectives = per_layer * args.n_layers / lo.pp + 2  # + vocab-parallel embedding and output
        parts["tp"] = CommPart(
            bytes=collectives * m * 2 * (t - 1) / t * act,
            inter_node=_inter_node(t, gpus_per_node),
            overlapped=False,
        )

    if lo.ep > 1:  # token dispatch and combine (llmtrain/plan/experts.py)
        full = lo.activation_checkpoint == "full"
        parts["ep"] = CommPart(
            bytes=dispatch_bytes(args, seq_len, lo.micro_batch_size, m, lo.ep, a, act_bytes, full) / lo.pp,
            inter_node=_inter_node(lo.ep * t, gpus_per_node),
            overlapped=False,
        )

    if lo.cp > 1:
        parts["cp"] = _context_parallel_part(args, seq_len, lo, m, gpus_per_node, act_bytes)

    if lo.pp > 1:
        n_mb = lo.pp_microbatches or m
        rows = lo.micro_batch_size * m // n_mb
        # the residual stream: bf16 only when FSDP casts the parameters (autocast keeps it fp32)
        boundary = rows * seq_len / lo.cp * args.dim * lo.residual_bytes / (t if lo.sequence_parallel else 1)
        directions = 1 if lo.pp == 2 else 2  # an end stage sends one way, a middle stage both
        parts["pp"] = CommPart(
            bytes=directions * n_mb * boundary,
            inter_node=_inter_node(lo.world, gpus_per_node),
            overlapped=False,
        )
    return parts


def _context_parallel_part(
    args: TransformerArgs, seq_len: int, lo: Layout, m: int, gpus_per_node: int, act_bytes: float
) -> CommPart:
    """K/V all-gather per layer and micro-batch (again in a full recompute) and the reduce-scatter of
    their gradients, over the cp group (inside the tp groups in the mesh order)."""
    kv = lo.micro_batch_size * seq_len * 2 * args.kv_heads * args.head_dim / lo.tp * act_bytes
    per_layer = 3 if lo.activation_checkpoint == "full" else 2
    return CommPart(
        bytes=per_layer * args.n_layers / lo.pp * m * (lo.cp - 1) / lo.cp * kv,
        inter_node=_inter_node(lo.cp * lo.tp, gpus_per_node),
        overlapped=False,
    )


def comm_time_s(
    parts: dict[str, CommPart], compute_s: float, intra_gbps: float, inter_gbps: float, overlap: float = 2 / 3
) -> tuple[float, float]:
    """(total, exposed) seconds: every part at its link's bus bandwidth (GB/s); data-parallel traffic
    hides behind `overlap` x compute (the backward's share), the rest adds to the step."""
    overlappable = exposed = 0.0
    for part in parts.values():
        secs = part.bytes / ((inter_gbps if part.inter_node else intra_gbps) * 1e9)
        if part.overlapped:
            overlappable += secs
        else:
            exposed += secs
    return overlappable + exposed, exposed + max(0.0, overlappable - overlap * compute_s)
