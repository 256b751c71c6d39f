"""Model shape schema. Presets live in conf/model/*.yaml and mirror this dataclass."""

import math
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

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_heads, or n_heads for plain MHA)."""
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width the model is built with (see `ffn_hidden_dim`)."""
        return ffn_hidden_dim(self.dim, self.ffn_dim, self.multiple_of, self.ffn_dim_multiplier)


def ffn_hidden_dim(dim: int, ffn_dim: int | None, multiple_of: int, multiplier: float | None) -> int:
    """SwiGLU width: explicit, or Llama's 2/3 * 4 * dim (times the multiplier) rounded up to multiple_of.
    The one formula: the model (TransformerArgs) and the layout rules (config/rules.py) both use it."""
    if ffn_dim is not None:
        return ffn_dim
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)
