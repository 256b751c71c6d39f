"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention through SDPA.

This file knows nothing of parallelism (docs/architecture.md). Build it on the meta device, let the
`llmtrain.parallel` functions transform it, then materialize and call `init_weights`.
"""

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.config.model import ffn_hidden_dim
from llmtrain.models.moe import MoE, MoEArgs


@dataclass(kw_only=True)
class TransformerArgs:
    """Shape of the decoder; mirrors `llmtrain.config.ModelConfig`."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    attn_head_dim: int | None = None
    qk_norm: bool = False
    moe_num_experts: int = 0
    moe_top_k: int = 2
    moe_expert_dim: int | None = None
    moe_shared_experts: int = 0
    moe_every: int = 1
    moe_first_k_dense: int = 0
    moe_score: str = "softmax"
    moe_norm_topk: bool = True
    moe_route_scale: float = 1.0
    moe_aux_loss_coef: float = 0.0
    moe_z_loss_coef: float = 0.0
    moe_bias_update_rate: float = 0.0
    moe_gemm: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.dim // self.n_heads

    @property
    def expert_dim(self) -> int:
        """SwiGLU width of one routed (or shared) expert."""
        return self.moe_expert_dim or self.hidden_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layer `layer_id` has an MoE feed-forward (after the first k dense ones, every moe_every-th)."""
        return (
            self.moe_num_experts > 0 and layer_id >= self.moe_first_k_dense and layer_id % self.moe_every == 0
        )

    def moe_args(self) -> MoEArgs:
        """The MoE layer's own arguments: each MoEArgs field `f` is this dataclass's `moe_f`."""
        names = [f.name for f in dataclasses.fields(MoEArgs) if f.name not in ("dim", "expert_dim")]
        return MoEArgs(
            dim=self.dim, expert_dim=self.expert_dim, **{n: getattr(self, f"moe_{n}") for n in names}
        )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: explicit, or Llama's 2/3 * 4 * dim rounded up to multiple_of."""
        return ffn_hidden_dim(self.dim, self.ffn_dim, self.multiple_of, self.ffn_dim_multiplier)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 for stability under bf16 autocast."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """Real-valued (cos, sin) RoPE table of shape (max_seq_len, head_dim // 2, 2).

    Real tensors (not complex) so that the table survives meta-device materialization, DTensor and
    torch.compile without special cases.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float64)
    freqs = torch.outer(t, inv)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (b, s, h, d) by the angles in rope (b|1, s, d/2, 2)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[..., 0].unsqueeze(-2), rope[..., 1].unsqueeze(-2)  # broadcast over heads
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """SDPA over (b, h, s, d) queries and (b, kv_h, s_k, d) keys/values; KV heads are repeated to the
    query heads (GQA). `mask` (bool, True = may attend) replaces the causal mask when given."""
    if k.shape[1] != q.shape[1]:  # GQA: repeat KV heads to match the query heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool], torch.Tensor]
"""(q, k, v, mask, causal) -> attention output (b, h, s, d); `Attention.attend`."""


class Attention(nn.Module):
    """Grouped-query attention; KV heads are shared by n_heads / n_kv_heads query heads.

    `attend` is the core (q, k, v) -> output step, SDPA by default; a parallel transform may replace
    it (context parallelism gathers K/V over its group first) without this file knowing why."""

    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # per-head RMSNorm of q and k before RoPE (Qwen3); one head_dim weight shared by all heads
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.attend: AttendFn = sdpa_attention

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # -1 instead of n_heads: under tensor parallelism each rank holds n_heads / tp heads.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
        out = self.attend(q, k, v, mask, causal)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x)); the ffn is a dense SwiGLU or,
    in the layers `TransformerArgs.is_moe_layer` names, a mixture of experts (llmtrain.models.moe)."""

    def __init__(self, args: TransformerArgs, layer_id: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module
        if args.is_moe_layer(layer_id):
            width = args.moe_shared_experts * args.expert_dim  # n shared experts == one n-times wider
            shared = FeedForward(args.dim, width) if width else None
            self.feed_forward = MoE(args.moe_args(), shared)
        else:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, causal)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder LM. Layers live in a ModuleDict keyed by their global index so that pipeline stages
    can delete the layers they do not own and checkpoints keep the same names under any layout.
    Stage-local modules may be None (tok_embeddings on later stages, norm/output on earlier ones).
    """

    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, i) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer(
            "rope", rope_tables(args.head_dim, args.max_seq_len, args.rope_theta), persistent=False
        )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """tokens (b, s) ids (or (b, s, dim) hidden states on a non-first pipeline stage) -> logits
        (b, s, vocab) (or hidden states on a non-last stage).

        positions (b, s) restart RoPE at document starts when packing with document masking; attn_mask
        (b, 1, s, s) bool, True = may attend, replaces the plain causal mask when given.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        seqlen = h.shape[1]
        rope = self.rope[:seqlen].unsqueeze(0) if positions is None else self.rope[positions]
        for layer in self.layers.values():
            h = layer(h, rope, attn_mask, causal)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def tie_weights(self) -> None:
        """Re-tie output to the embedding: `to_empty()` materialises each module's parameters
        separately, which silently unties them (found by test_tied_embeddings_share_storage)."""
        if self.args.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int, buffer_device: torch.device | None = None) -> None:
        """Deterministic init that does not depend on the parallel layout.

        Each element comes from a counter-based generator addressed by (seed, parameter name, global
        element index) and each rank computes only the elements of its local shard, so dp, tp, pp and
        ZeRO runs all start from the same weights as the single-process run (the basis of every
        parity test) at a cost that scales with the shard, not the model.
        """
        from llmtrain.models.init import fill_param  # local import keeps this file torch-only

        self.tie_weights()
        self.rope = rope_tables(
            self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device=buffer_device
        )
        for name, p, draw, param_seed in self.init_plan(seed):
            fill_param(p, draw, seed=param_seed, name=name)
        for module in self.modules():
            if isinstance(module, MoE):
                module.reset_buffers()

    def init_plan(self, seed: int) -> Iterator[tuple[str, nn.Parameter, Callable, int]]:
        """(name, parameter, draw(uniforms), seed) of every parameter: the init rule, apart from
        how a rank reaches its storage (plain/DTensor here; DeepSpeed ZeRO-3 gathers one at a time)."""
        std, out_std = self.args.init_std, self.args.init_std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            parts = name.split(".")  # the module's name (wo in ...wo.weight), or the expert tensor's (w2)
            leaf = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
            if name.endswith("norm.weight"):
                yield name, p, _ones, 0
            elif leaf in ("wo", "w2"):
                yield name, p, _normal(out_std), seed
            else:
                yield name, p, _normal(std), seed


def _ones(u: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(u)


def _normal(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, std) truncated at +-3 std from the per-element uniforms of `llmtrain.models.init`."""
    from llmtrain.models.init import trunc_normal  # local import keeps this file torch-only

    return trunc_normal(std, bound=3.0)
