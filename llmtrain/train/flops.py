"""Model FLOPs per token and MFU. Counts matmul FLOPs (2 per multiply-add) of the forward pass and
takes backward as 2x forward; attention scores/values are counted causally-unmasked like PaLM's
appendix B (12 * n_layers * dim * seq per token for fwd+bwd)."""

from llmtrain.models.llama import TransformerArgs

# Dense bf16 peak TFLOP/s per device (no sparsity). Sources: NVIDIA/AMD datasheets.
PEAK_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "A100": 312.0,
    "A10G": 70.0,
    "L4": 121.0,
    "L40S": 362.0,
    "V100": 125.0,
    "MI300X": 1307.0,
}


def flops_per_token(args: TransformerArgs, seq_len: int, recompute: bool = False) -> float:
    """Training FLOPs per token (forward + backward [+ recomputed forward for HFU])."""
    d, L, hd = args.dim, args.n_layers, args.head_dim
    q = d * args.n_heads * hd
    kv = 2 * d * args.kv_heads * hd
    o = args.n_heads * hd * d
    mlp = 3 * d * args.hidden_dim
    per_layer_params = q + kv + o + mlp
    fwd = 2 * (L * per_layer_params + d * args.vocab_size)  # projections + output head
    fwd += 2 * 2 * L * seq_len * args.n_heads * hd  # QK^T and AV, full (unmasked) square
    return fwd * (4 if recompute else 3)


def device_peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s for a device name (substring match), or the override."""
    if override:
        return override
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if all(part.lower() in device_name.lower() for part in key.split()):
            return PEAK_TFLOPS[key]
    return None
