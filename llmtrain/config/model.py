"""Model shape schema. Presets live in conf/model/*.yaml and mirror this dataclass."""

import math
from dataclasses import dataclass

from omegaconf import MISSING

from llmtrain.config.errors import check, check_choice


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama-style decoder; every field maps 1:1 onto `llmtrain.models.TransformerArgs`."""

    name: str = MISSING
    """Preset name, recorded in the run (e.g. tiny, 125m, 1b, 7b, 70b)."""
    dim: int = MISSING
    """Hidden size."""
    n_layers: int = MISSING
    """Number of transformer blocks."""
    n_heads: int = MISSING
    """Attention (query) heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain MHA)."""
    vocab_size: int = MISSING
    """Embedding rows; must be >= the tokenizer's vocabulary (checked against the data index)."""
    ffn_dim: int | None = None
    """SwiGLU hidden size; None derives it Llama-style from dim, multiple_of, ffn_dim_multiplier."""
    multiple_of: int = 256
    """Round the derived ffn_dim up to this multiple."""
    ffn_dim_multiplier: float | None = None
    """Optional scale on the derived ffn_dim (Llama 3 uses 1.3 at 70B)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_seq_len: int = 2048
    """Longest sequence the RoPE table is built for."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    init_std: float = 0.02
    """Std of the normal init; output projections are scaled by 1/sqrt(2*n_layers)."""
    attn_head_dim: int | None = None
    """Width of one attention head; None means dim / n_heads (Qwen3 uses 128 at dim 2048, 32 heads)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head (head_dim weights) before RoPE (Qwen3, OLMoE-style)."""
    moe_num_experts: int = 0
    """Routed experts per MoE layer; 0 builds a dense model (docs/moe.md)."""
    moe_top_k: int = 2
    """Experts each token is routed to (token-choice top-k)."""
    moe_expert_dim: int | None = None
    """SwiGLU width of one expert; None means the dense hidden size (ffn_dim)."""
    moe_shared_experts: int = 0
    """Always-active experts of width moe_expert_dim added to the routed ones (DeepSeek)."""
    moe_every: int = 1
    """Layer i (>= moe_first_k_dense) is MoE when i % moe_every == 0; the others stay dense."""
    moe_first_k_dense: int = 0
    """The first k layers keep the dense FFN (DeepSeek-V3 keeps 3)."""
    moe_score: str = "softmax"
    """Router scores: softmax (Mixtral, OLMoE, Qwen3) or sigmoid (DeepSeek-V3)."""
    moe_norm_topk: bool = True
    """Renormalise the chosen experts' weights to sum to 1 (OLMoE: false)."""
    moe_route_scale: float = 1.0
    """Factor on the routing weights (DeepSeek-V3: 2.5)."""
    moe_aux_loss_coef: float = 0.0
    """Load-balancing loss coefficient (per sequence, weighted by its target tokens; docs/moe.md)."""
    moe_z_loss_coef: float = 0.0
    """Router z-loss coefficient (mean squared logsumexp of the router logits)."""
    moe_bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): per-expert selection bias moved by this much per step
    towards the mean load, outside the gradient; 0 disables it."""
    moe_gemm: str = "auto"
    """Expert matmuls: grouped (torch._grouped_mm), loop (one matmul per expert) or auto (grouped
    where it runs on the device and dtype, else loop)."""

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_heads, or n_heads for plain MHA)."""
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width the model is built with (see `ffn_hidden_dim`)."""
        return ffn_hidden_dim(self.dim, self.ffn_dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def head_dim(self) -> int:
        """Width of one attention head (attn_head_dim, or dim / n_heads)."""
        return self.attn_head_dim or self.dim // self.n_heads


MOE_SCORES = ("softmax", "sigmoid")
MOE_GEMMS = ("auto", "grouped", "loop")


def check_moe_fields(m: ModelConfig) -> None:
    """Ranges and choices of the model.moe_* keys (run by config/validate.py at compose time)."""
    check(m.moe_num_experts >= 0, "model.moe_num_experts", "must be >= 0 (0: dense model)")
    if m.moe_num_experts == 0:
        return
    check(
        1 <= m.moe_top_k <= m.moe_num_experts,
        "model.moe_top_k",
        f"{m.moe_top_k} must be within [1, model.moe_num_experts={m.moe_num_experts}]",
    )
    check(m.moe_every >= 1, "model.moe_every", "must be >= 1")
    check(
        0 <= m.moe_first_k_dense < m.n_layers,
        "model.moe_first_k_dense",
        f"{m.moe_first_k_dense} must be within [0, model.n_layers={m.n_layers}) (no MoE layer left)",
    )
    check(m.moe_shared_experts >= 0, "model.moe_shared_experts", "must be >= 0")
    check(m.moe_expert_dim is None or m.moe_expert_dim > 0, "model.moe_expert_dim", "must be positive")
    check_choice("model.moe_score", m.moe_score, MOE_SCORES)
    check_choice("model.moe_gemm", m.moe_gemm, MOE_GEMMS)
    for key in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_update_rate"):
        check(getattr(m, key) >= 0, f"model.{key}", f"must be >= 0, got {getattr(m, key)}")


def ffn_hidden_dim(dim: int, ffn_dim: int | None, multiple_of: int, multiplier: float | None) -> int:
    """SwiGLU width: explicit, or Llama's 2/3 * 4 * dim (times the multiplier) rounded up to multiple_of.
    The one formula: the model (TransformerArgs) and the layout rules (config/rules.py) both use it."""
    if ffn_dim is not None:
        return ffn_dim
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)
