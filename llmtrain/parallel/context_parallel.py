"""Context parallelism (`parallel.cp`): each sequence is split over the cp ranks, K/V all-gathered.

Load balance. A sequence of S tokens is cut into 2·cp chunks of c = S / (2·cp); cp rank i holds
chunks i and 2·cp-1-i (torchtitan's head-tail load balancer, Megatron-core's `get_batch_on_this_cp_rank`).
Under a causal mask the work of a query grows with its position, so pairing an early chunk with a late
one gives every rank the same number of visible (query, key) pairs: about (i + 1/2)c² + (2cp - i - 1/2)c² = 2cp·c².

Attention (the all-gather variant Llama 3 used). Every rank computes q, k, v for its own 2c tokens;
k and v are all-gathered over the cp group (one collective per layer for both), so each rank holds the
K/V of the whole sequence, in gathered order [chunks of rank 0, of rank 1, ...], and runs SDPA for its
queries against all keys with the exact mask: key j is visible to query i iff global(j) <= global(i)
(and, with packed documents, the batch's document mask, whose rows and columns `shard_batch` picks
by the same global indices). The gather is differentiable: its backward sums the K/V gradients of
all ranks and returns each rank its slice (a reduce-scatter, which gloo on CPU runs as an all-reduce
of the whole input: twice the bytes).

Everything else is token-local: RoPE takes the tokens' global positions (or the document positions,
sliced), the loss is token-weighted with the global token count, and for the weights a cp rank is a
data-parallel rank (`ParallelDims.dp_cp_mesh`): gradients are averaged over dp x cp, with the loss
scaled by dp·cp / N (llmtrain.parallel.step, whose math is unchanged).
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmtrain.data.loader import Batch
from llmtrain.models.llama import Transformer, sdpa_attention


def chunk_index(seq_len: int, cp: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Global token indices held by cp `rank`: chunk `rank`, then chunk 2·cp-1-rank."""
    c = seq_len // (2 * cp)
    head = torch.arange(rank * c, (rank + 1) * c, device=device)
    tail = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([head, tail])


def gathered_index(seq_len: int, cp: int, device: torch.device | None = None) -> torch.Tensor:
    """Global token index of each position of the all-gathered K/V (ranks' chunks in rank order)."""
    return torch.cat([chunk_index(seq_len, cp, r, device) for r in range(cp)])


def shard_batch(batch: Batch, cp: int, rank: int) -> Batch:
    """This cp rank's part of a micro-batch that every cp rank of a dp rank loaded whole: inputs and
    targets of its two chunks, RoPE positions of those tokens (global positions, or the document
    positions when packing with document masks), and the document mask's rows of its queries
    against the columns of the gathered keys."""
    b, s = batch.inputs.shape
    dev = batch.inputs.device
    idx = chunk_index(s, cp, rank, dev)
    positions = batch.positions if batch.positions is not None else torch.arange(s, device=dev).expand(b, s)
    mask = None
    if batch.attn_mask is not None:
        mask = batch.attn_mask.index_select(2, idx).index_select(3, gathered_index(s, cp, dev))
    return Batch(batch.inputs[:, idx], batch.targets[:, idx], positions[:, idx], mask)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim `dim` over `group`; backward: reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        world = dist.get_world_size(group)
        local = x.movedim(dim, 0).contiguous()
        out = local.new_empty((world * local.shape[0], *local.shape[1:]))
        dist.all_gather_single(out, local, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        full = grad.movedim(ctx.dim, 0).contiguous()
        part = full.new_empty((full.shape[0] // dist.get_world_size(ctx.group), *full.shape[1:]))
        dist.reduce_scatter_single(part, full, group=ctx.group)  # gloo runs it as an all-reduce
        return part.movedim(0, ctx.dim), None, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Differentiable all-gather of `x` along `dim` over the cp group (see the module docstring)."""
    return _GatherSequence.apply(x, group, dim)


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PrefixCausalAttention(torch.autograd.Function):
    """Queries of one chunk (c tokens) against the keys of every earlier chunk (all visible) and of
    their own chunk (causal), without materialising a mask: two flash-attention blocks merged by their
    log-sum-exp. Backward runs each block's flash backward with the merged output and log-sum-exp
    (the ring-attention decomposition), so the result and its gradients are those of one causal SDPA.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = q.shape[2]
        out, lse = _FLASH_CPU(q, k[:, :, -c:], v[:, :, -c:], 0.0, True)
        if k.shape[2] > c:
            past, past_lse = _FLASH_CPU(q, k[:, :, :-c], v[:, :, :-c], 0.0, False)
            merged = torch.logaddexp(lse, past_lse)
            # the log-sum-exps are fp32: merge in fp32, hand back (and save) q's dtype, as one SDPA does
            out = out * (lse - merged).exp().unsqueeze(-1) + past * (past_lse - merged).exp().unsqueeze(-1)
            out, lse = out.to(q.dtype), merged
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        c, grad = q.shape[2], grad.to(q.dtype).contiguous()  # the flash kernels take one dtype
        dq, dk_d, dv_d = _FLASH_CPU_BWD(grad, q, k[:, :, -c:], v[:, :, -c:], out, lse, 0.0, True)
        if k.shape[2] == c:
            return dq, dk_d, dv_d
        dq_p, dk_p, dv_p = _FLASH_CPU_BWD(grad, q, k[:, :, :-c], v[:, :, :-c], out, lse, 0.0, False)
        return dq + dq_p, torch.cat([dk_p, dk_d], dim=2), torch.cat([dv_p, dv_d], dim=2)


def causal_chunks_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: int, rank: int
) -> torch.Tensor:
    """Exact causal attention of this rank's two chunks (q: (b, h, 2c, d)) against the whole
    sequence's K/V in gathered order (b, h, S, d), with memory linear in S (no S x S mask)."""
    s, c = k.shape[2], q.shape[2] // 2
    order = torch.argsort(gathered_index(s, cp, k.device))  # gathered -> global token order
    k, v = k.index_select(2, order), v.index_select(2, order)
    outs = []
    for j, chunk in enumerate((rank, 2 * cp - 1 - rank)):
        end = (chunk + 1) * c
        qj = q[:, :, j * c : (j + 1) * c]
        outs.append(_PrefixCausalAttention.apply(qj.contiguous(), k[:, :, :end], v[:, :, :end]))
    return torch.cat(outs, dim=2)


class ContextParallelAttention:
    """`Attention.attend` under context parallelism: K/V gathered over the cp group, SDPA of the local
    queries against all keys with the exact causal (or the batch's document) mask."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.cp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def causal_mask(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """(2c, S) bool: local query i may see gathered key j iff global(j) <= global(i)."""
        key = (seq_len, device)
        if key not in self._masks:
            q = chunk_index(seq_len, self.cp, self.rank, device)
            k = gathered_index(seq_len, self.cp, device)
            self._masks[key] = k.unsqueeze(0) <= q.unsqueeze(1)
        return self._masks[key]

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        kv = gather_sequence(torch.stack([k, v]), self.group, dim=3)  # (2, b, kv_h, S, d): one collective
        if mask is None and causal and q.device.type == "cpu":
            k, v = kv[0], kv[1]
            if k.shape[1] != q.shape[1]:  # GQA: repeat KV heads to match the query heads
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            return causal_chunks_attention(q, k, v, self.cp, self.rank)
        if mask is None and causal:  # elsewhere: SDPA with the explicit (2c, S) mask
            mask = self.causal_mask(kv.shape[3], q.device)
        return sdpa_attention(q, kv[0], kv[1], mask, causal)


def apply_context_parallel(model: Transformer | nn.Module, group: dist.ProcessGroup) -> None:
    """Give every attention layer of `model` (or a stage) the context-parallel `attend`."""
    attend = ContextParallelAttention(group)
    for block in model.layers.values():
        block.attention.attend = attend
