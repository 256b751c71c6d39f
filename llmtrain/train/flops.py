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
MoE layers (`active_ffn_weights`) count the weights a token actually uses: its top-k experts, the
shared experts and the router; the dispatch (sort, gather, weighted sum) moves data and is not counted.
"""

import re
from typing import Any

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
    attn_weights = d * q_dim + 2 * d * kv_dim + q_dim * d
    attention = 2 * 2 * seq_len * q_dim  # QK^T and AV over the full square (see module doc)
    blocks = args.n_layers * (2 * attn_weights + attention) + 2 * active_ffn_weights(args)[0]
    head = 2 * d * args.vocab_size
    return float(blocks), float(head)


def active_ffn_weights(args: TransformerArgs) -> tuple[int, int]:
    """Feed-forward weights one token uses, summed over the layers, and the part of them in the last
    projections (w2). Dense layers: the SwiGLU; MoE layers: top_k routed experts + shared experts +
    the router (the MFU numerator counts active, not total, parameters)."""
    d, total, last = args.dim, 0, 0
    for layer in range(args.n_layers):
        if args.is_moe_layer(layer):
            width = (args.moe_top_k + args.moe_shared_experts) * args.expert_dim
            total += 3 * d * width + d * args.moe_num_experts
        else:
            width = args.hidden_dim
            total += 3 * d * width
        last += d * width
    return total, last


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
    rerun = blocks - 2 * active_ffn_weights(args)[1]  # w2 is not recomputed
    return 3 * (blocks + head) + float(recompute) * rerun


# Dense (tf32 tensor-core, plain fp32) TFLOP/s per table label, from the same datasheets (sparse
# tf32 figures halved). An fp32 run with TF32 off (torch's default for matmuls) runs at the fp32
# rate: 67 on an H100 SXM, 15x below its bf16 peak. No TF32 (V100) runs fp32.
FP32_TFLOPS: dict[str, tuple[float, float]] = {
    "GH200": (494.7, 67.0),
    "H200 NVL": (417.5, 60.0),
    "H200 SXM": (494.7, 67.0),
    "H100 PCIe": (378.0, 51.0),
    "H100 NVL": (417.5, 60.0),
    "H100 SXM": (494.7, 67.0),
    "H800 PCIe": (378.0, 51.0),
    "H800 SXM": (494.7, 67.0),
    "H20": (74.0, 44.0),
    "B200": (1125.0, 75.0),
    "A100": (156.0, 19.5),
    "A800": (156.0, 19.5),
    "L40S": (183.0, 91.6),
    "L40": (90.5, 90.5),
    "L4": (60.0, 30.3),
    "A10G": (35.0, 31.2),
    "A10": (62.5, 31.2),
    "V100 (fp16; no bf16)": (15.7, 15.7),
    "MI325X": (653.7, 163.4),
    "MI300X": (653.7, 163.4),
    "MI250X": (95.7, 95.7),
}
COMPUTE_PRECISIONS = ("fp8", "bf16", "tf32", "fp32")


def compute_precision(
    precision: str, param_dtype: str = "fp32", tf32: bool = False, fp8: bool = False
) -> str:
    """Which tensor-core rate the matmuls run at: fp8 with parallel.fp8 on, bf16 under autocast
    (trainer.precision=bf16) or bf16 ZeRO parameters (parallel.param_dtype=bf16), else tf32 when TF32
    matmuls are allowed, else plain fp32."""
    if fp8:
        return "fp8"
    if precision == "bf16" or param_dtype == "bf16":
        return "bf16"
    return "tf32" if tf32 else "fp32"


LORA_SHAPES = {  # target module -> (in, out) as multiples of (dim, q_dim, kv_dim, ffn hidden, vocab)
    "wq": ("d", "q"),
    "wk": ("d", "kv"),
    "wv": ("d", "kv"),
    "wo": ("q", "d"),
    "w1": ("d", "f"),
    "w3": ("d", "f"),
    "w2": ("f", "d"),
    "output": ("d", "v"),
}


def lora_flops_per_token(
    args: TransformerArgs, seq_len: int, rank: int, targets: list[str], recompute: float = 0.0
) -> float:
    """`flops_per_token` of a LoRA run. The base weights are frozen, so their backward computes the
    input gradient only (forward + backward = 2 x forward, 4 FLOPs per weight and token instead of
    6; counting 6 put MFU above 100%); attention (no weights) and the adapters (2 r (in + out) per
    token forward) keep 3 x forward. Autograd also skips every input gradient nothing upstream
    needs: with frozen embeddings, the first block's q/k/v projections (`_lora_skipped`).
    `tests/train/test_flops.py` checks this against FlopCounterMode exactly. HFU adds the base
    blocks' recomputed forward, as `flops_per_token` does."""
    sizes = _sizes(args)
    blocks, head = forward_flops_per_token(args, seq_len)
    attention = args.n_layers * 2 * 2 * seq_len * sizes["q"]
    weights = blocks - attention + head  # forward FLOPs of the (frozen) base matmuls
    adapters = sum(
        2
        * rank
        * (sizes[LORA_SHAPES[n][0]] + sizes[LORA_SHAPES[n][1]])
        * (1 if n == "output" else args.n_layers)
        for n in targets
    )
    rerun = (
        blocks - args.n_layers * 2 * args.hidden_dim * args.dim
    )  # as flops_per_token: w2 is not recomputed
    skipped = _lora_skipped(args, seq_len, rank, set(targets))
    return 2 * weights + 3 * (attention + adapters) - skipped + float(recompute) * rerun


def _sizes(args: TransformerArgs) -> dict[str, int]:
    hd = args.head_dim
    q, kv = args.n_heads * hd, args.kv_heads * hd
    return {"d": args.dim, "q": q, "kv": kv, "f": args.hidden_dim, "v": args.vocab_size}


def _lora_skipped(args: TransformerArgs, seq_len: int, rank: int, targets: set[str]) -> float:
    """Backward FLOPs per token that autograd never runs because the input of an op needs no
    gradient: walking the blocks in order, the residual stream needs one only after the first
    trainable adapter. A frozen matmul then skips its input gradient (its forward FLOPs), an
    adapter the input gradient of A (2 r in), attention each of dQ, dK, dP, dV it does not need."""
    sz, r, grad = _sizes(args), rank, False
    matmul = lambda name: 2 * sz[LORA_SHAPES[name][0]] * sz[LORA_SHAPES[name][1]]
    adapter_in = lambda name: 2 * r * sz[LORA_SHAPES[name][0]] if name in targets else 0
    skip = lambda names, needed: 0.0 if needed else float(sum(matmul(n) + adapter_in(n) for n in names))
    skipped = 0.0
    for _ in range(args.n_layers):
        if grad:  # every later block needs all its input gradients
            break
        q, k, v = ("wq" in targets), ("wk" in targets), ("wv" in targets)
        skipped += skip(("wq", "wk", "wv"), False)
        skipped += 2 * seq_len * sz["q"] * sum(not x for x in (q, k, q or k, v))
        attn = q or k or v
        skipped += skip(("wo",), attn)
        grad = attn or "wo" in targets
        skipped += skip(("w1", "w3"), grad)
        inner = grad or "w1" in targets or "w3" in targets
        skipped += skip(("w2",), inner)
        grad = inner or "w2" in targets
    return skipped + skip(("output",), grad)


def run_flops_per_token(cfg: Any, args: TransformerArgs, seq_len: int, recompute: float = 0.0) -> float:
    """The MFU (recompute=0) or HFU numerator of a run: `lora_flops_per_token` under peft.method=lora,
    else `flops_per_token`."""
    p = cfg.peft
    if p.method == "lora":
        return lora_flops_per_token(args, seq_len, p.rank, list(p.target_modules), recompute)
    return flops_per_token(args, seq_len, recompute)


def lookup_peak_tflops(device_name: str, precision: str = "bf16") -> tuple[str, float] | None:
    """(table label, dense TFLOP/s in `precision`: fp8, bf16, tf32 or fp32) for a device name as torch
    reports it, or None (also for fp8 on a GPU without FP8 tensor cores)."""
    if precision not in COMPUTE_PRECISIONS:
        raise ValueError(f"precision {precision!r}; allowed: {COMPUTE_PRECISIONS}")
    table = FP8_PEAK_TFLOPS if precision == "fp8" else PEAK_TFLOPS
    for pattern, label, tflops in table:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if precision in ("fp8", "bf16"):
                return label, tflops
            return label, FP32_TFLOPS[label][precision == "fp32"]
    return None


def device_peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one device (the override wins), or None when the name is unknown."""
    if override:
        return float(override)
    found = lookup_peak_tflops(device_name)
    return found[1] if found else None
