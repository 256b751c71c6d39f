"""Model shape schema. Presets live in conf/model/*.yaml and mirror this dataclass."""

from dataclasses import dataclass

from omegaconf import MISSING


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
