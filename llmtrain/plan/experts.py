"""Mixture-of-experts terms of the planner: parameters of the MoE layers, their split over expert
parallelism, and the all-to-all volume of the token dispatch (llmtrain/parallel/expert_parallel.py).

An MoE layer replaces the block's SwiGLU (3 d f) by a router (E d), E routed SwiGLU experts
(3 d f_e each) and optional shared experts (3 d f_e n_shared). Under `parallel.ep` each rank holds
E/ep of the routed experts; ZeRO shards those over the edp = dp/ep ranks that hold the same ones.

Dispatch volume, per MoE layer and micro-batch of R = micro_batch_size x seq rows, with top-k:
R k (token, choice) rows of d values go out (dispatch) and come back (combine) in the forward and
their gradients travel the reverse way in the backward, 4 all-to-alls; full activation checkpointing
re-runs the forward's 2. With balanced routing a fraction (ep-1)/ep of them leaves the rank. The
dispatched rows have the parameters' dtype (the normalised hidden state), the combined ones the
compute dtype (the experts' output under autocast).
"""

from llmtrain.models.llama import TransformerArgs


def moe_layer_count(args: TransformerArgs) -> int:
    """Blocks whose feed-forward is an MoE (model.moe_every / moe_first_k_dense)."""
    return sum(args.is_moe_layer(i) for i in range(args.n_layers))


def routed_expert_params(args: TransformerArgs) -> int:
    """Weights of all routed experts of the model (what expert parallelism splits)."""
    return moe_layer_count(args) * args.moe_num_experts * 3 * args.dim * args.expert_dim


def moe_param_delta(args: TransformerArgs) -> int:
    """Parameters the MoE layers add over dense SwiGLUs of `ffn_dim` (0 for a dense model)."""
    n = moe_layer_count(args)
    if n == 0:
        return 0
    d, e = args.dim, args.moe_num_experts
    shared = 3 * d * args.moe_shared_experts * args.expert_dim
    return n * (e * d + shared - 3 * d * args.hidden_dim) + routed_expert_params(args)


def expert_params_off_rank(args: TransformerArgs, ep: int, pp: int) -> float:
    """Routed-expert parameters of one pipeline stage's share that live on the other ep ranks."""
    return routed_expert_params(args) * (1 - 1 / ep) / pp


def zero_expert_correction(args: TransformerArgs, ep: int, dp: int, dp_shard: int, pp: int) -> float:
    """Under ZeRO with ep > 1 a rank's E/ep experts are sharded over edp = dp/ep ranks, not over
    dp_shard: what to add to `params / dp_shard` to get the rank's sharded parameters."""
    if ep <= 1:
        return 0.0
    local = routed_expert_params(args) / (ep * pp)
    return local * (ep / dp - 1 / dp_shard)


def dispatch_bytes(
    args: TransformerArgs,
    seq_len: int,
    micro_batch_size: int,
    grad_accum: int,
    ep: int,
    a: float,
    act: float,
    full_recompute: bool,
) -> float:
    """Bytes one rank sends in the token all-to-alls of a step (module docstring), balanced routing."""
    if ep <= 1:
        return 0.0
    rows = micro_batch_size * seq_len * args.moe_top_k * args.dim * (ep - 1) / ep
    per_layer = 2 * (a + act) + ((a + act) if full_recompute else 0.0)
    return moe_layer_count(args) * grad_accum * rows * per_layer
