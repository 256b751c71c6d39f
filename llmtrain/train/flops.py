"""Training FLOPs per token (MFU and HFU numerators) and the peak-FLOPs table (their denominator).

Counting convention (the one PaLM appendix B, Megatron-LM and torchtitan use, so MFU figures are
comparable across frameworks):
- a matmul of (m x k) @ (k x n) costs 2*m*k*n FLOPs; elementwise ops, norms, RoPE, softmax and the
  loss are not counted (< 1% at the sizes we train);
- projections: 2 FLOPs per weight per token for q, k, v (GQA: k and v have n_kv_heads heads), o,
  the three SwiGLU matrices and the output head (also when it is tied to the embedding: the matmul
  still runs). The embedding lookup is a gather: 0 FLOPs;
- attention: QK^T and softmax(.)V cost 2 * 2 * seq * n_heads * head_dim per token and layer, counted
  over the *full* seq x seq square even though the mask is causal. A causal kernel (FlashAttention)
  skips about half of that, so this term overstates the useful work by up to 2x; it is what every
  published MFU uses;
- backward = 2 x forward (input and weight gradients). FlashAttention's backward also recomputes
  QK^T; that is hardware work, not model work, and is not counted.
MFU uses 3 x forward. HFU adds the forward that activation checkpointing runs again in backward: of
each checkpointed block, all but its last matmul (torch's non-reentrant checkpoint stops recomputing
as soon as every tensor backward needs is back, and the SwiGLU w2 output is not one of them); the
output head is never recomputed. `tests/train/test_flops.py` checks these numbers
against torch's FlopCounterMode on the real model.
"""

import re

from llmtrain.models.llama import TransformerArgs

AC_MODES_RECOMPUTE = ("none", "selective", "full")

# Dense (no 2:4 sparsity) bf16 tensor-core peak TFLOP/s per device from vendor datasheets, matched
# against `torch.cuda.get_device_name()` in order: the first pattern that matches wins, so variants
# come before the family default. Names as torch reports them, e.g. "NVIDIA H100 80GB HBM3" (SXM),
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB", "AMD Instinct MI300X".
PEAK_TFLOPS: list[tuple[str, str, float]] = [
    (r"\bGH200\b", "GH200", 989.4),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835.5),
    (r"\bH200\b", "H200 SXM", 989.4),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.5),
    (r"\bH100\b", "H100 SXM", 989.4),
    (r"\bH800\b.*\bPCIe\b", "H800 PCIe", 756.0),
    (r"\bH800\b", "H800 SXM", 989.4),
    (r"\bH20\b", "H20", 148.0),
    (r"\bB200\b", "B200", 2250.0),
    (r"\bA100\b", "A100", 312.0),
    (r"\bA800\b", "A800", 312.0),
    (r"\bL40S\b", "L40S", 362.05),
    (r"\bL40\b", "L40", 181.05),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10G\b", "A10G", 70.0),
    (r"\bA10\b", "A10", 125.0),
    (r"\bV100\b", "V100 (fp16; no bf16)", 125.0),
    (r"\bMI325X\b", "MI325X", 1307.4),
    (r"\bMI300X\b", "MI300X", 1307.4),
    (r"\bMI250X?\b", "MI250X", 383.0),
]

# Dense FP8 tensor-core peak TFLOP/s (parallel.fp8 on), same matching rules. Vendor datasheets list
# FP8 "with sparsity"; dense is half: H100 SXM 3958 -> 1979 (PCIe 3026 -> 1513, NVL 3341 -> 1671),
# H200 SXM 3958 -> 1979 (NVL 3341 -> 1671), HGX B200 9 PFLOP/s -> 4500 (FP8 and MXFP8 alike),
# L40S 1466 -> 733, L4 485 -> 242.5. GPUs without FP8 tensor cores (A100 and older) have no entry.
FP8_PEAK_TFLOPS: list[tuple[str, str, float]] = [
    (r"\bGH200\b", "GH200", 1979.0),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 1671.0),
    (r"\bH200\b", "H200 SXM", 1979.0),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 1513.0),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 1671.0),
    (r"\bH100\b", "H100 SXM", 1979.0),
    (r"\bB200\b", "B200", 4500.0),
    (r"\bL40S\b", "L40S", 733.0),
    (r"\bL4\b", "L4", 242.5),
]


def forward_flops_per_token(args: TransformerArgs, seq_len: int) -> tuple[float, float]:
    """Forward FLOPs per token as (all transformer blocks, output head)."""
    d, hd = args.dim, args.head_dim
    q_dim, kv_dim = args.n_heads * hd, args.kv_heads * hd
    block_weights = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * args.hidden_dim
    attention = 2 * 2 * seq_len * q_dim  # QK^T and AV over the full square (see module doc)
    blocks = args.n_layers * (2 * block_weights + attention)
    head = 2 * d * args.vocab_size
    return float(blocks), float(head)


def recompute_fraction(activation_checkpoint: str, n_layers: int) -> float:
    """Share of transformer blocks whose forward runs twice: none 0, full 1, selective = every
    other block starting with the first ((n_layers + 1) // 2 of them, as
    `llmtrain.parallel.parallelize.apply_activation_checkpointing` does)."""
    if activation_checkpoint not in AC_MODES_RECOMPUTE:
        raise ValueError(
            f"parallel.activation_checkpoint={activation_checkpoint!r}; allowed: {AC_MODES_RECOMPUTE}"
        )
    return {"none": 0.0, "full": 1.0, "selective": ((n_layers + 1) // 2) / max(n_layers, 1)}[
        activation_checkpoint
    ]


def flops_per_token(args: TransformerArgs, seq_len: int, recompute: float = 0.0) -> float:
    """Training FLOPs per token: 3 x forward, plus `recompute` (0..1, the share of blocks that
    activation checkpointing re-runs) x their recomputed forward. recompute=0 gives the MFU numerator
    (model FLOPs), the checkpointing share gives the HFU numerator (hardware FLOPs)."""
    blocks, head = forward_flops_per_token(args, seq_len)
    rerun = blocks - args.n_layers * 2 * args.hidden_dim * args.dim  # w2 is not recomputed
    return 3 * (blocks + head) + float(recompute) * rerun


def lookup_peak_tflops(
    device_name: str, table: list[tuple[str, str, float]] = PEAK_TFLOPS
) -> tuple[str, float] | None:
    """(table label, dense TFLOP/s) for a device name as torch reports it, or None. `table`:
    PEAK_TFLOPS (bf16) or FP8_PEAK_TFLOPS."""
    for pattern, label, tflops in table:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return label, tflops
    return None


def device_peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one device (the override wins), or None when the name is unknown."""
    if override:
        return float(override)
    found = lookup_peak_tflops(device_name)
    return found[1] if found else None
