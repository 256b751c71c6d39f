"""Parallel layout schema: dp_replicate x dp_shard x cp x pp x tp = world size (ep is carved from dp)."""

from dataclasses import dataclass, field

from llmtrain.config.fp8 import Fp8Config

BACKENDS = ("native", "deepspeed", "megatron")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev")
AC_MODES = ("none", "selective", "full")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass(kw_only=True)
class ParallelConfig:
    """How ranks are arranged and which engine applies the layout."""

    backend: str = "native"
    """Engine: native (torch DTensor/FSDP2/pipelining), deepspeed, megatron."""
    dp_replicate: int = -1
    """Replicated data-parallel degree (DDP, or the replica groups of HSDP); -1 fills the world."""
    dp_shard: int = 1
    """Sharded data-parallel degree (ZeRO/FSDP group); -1 fills the world."""
    tp: int = 1
    """Tensor-parallel degree (Megatron-style column/row split)."""
    pp: int = 1
    """Pipeline-parallel stages."""
    ep: int = 1
    """Expert-parallel degree (MoE models): the routed experts of each MoE layer are split over groups
    of `ep` data-parallel ranks (each holds moe_num_experts / ep), tokens travel by all-to-all. Carved
    from the data-parallel ranks: it must divide dp_replicate x dp_shard (docs/moe.md)."""
    cp: int = 1
    """Context-parallel degree: each sequence is split over cp ranks in 2*cp load-balanced chunks (rank i
    holds chunks i and 2*cp-1-i), K/V all-gathered in attention (docs/context_parallel.md)."""
    zero_stage: int = 0
    """0 = DDP; 1 = sharded optimizer state; 2 = + sharded grads; 3 = + sharded params (FSDP2).
    Stages 1-3 shard over dp_shard (HSDP when dp_replicate > 1 too); dp_shard > 1 needs stage >= 1."""
    sequence_parallel: bool = True
    """With tp > 1, shard norm/residual activations along the sequence."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved_1f1b, interleaved_zb (zero bubble, looped stages),
    zbv, dualpipev (zero bubble, two V-placed stages per rank)."""
    pp_microbatches: int | None = None
    """Pipeline micro-batches per step (>= pp); None = the gradient-accumulation count, i.e. one
    pipeline micro-batch per trainer.micro_batch_size sequences."""
    pp_virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved_1f1b / interleaved_zb need >= 2, zbv / dualpipev
    exactly 2)."""
    pp_layers_per_stage: list[int] | None = None
    """Explicit layer counts per (virtual) stage; None splits n_layers evenly."""
    activation_checkpoint: str = "none"
    """Recompute activations in backward: none, selective (every other block), full."""
    compile: bool = False
    """torch.compile each transformer block (tested on GPU; CPU compile is too slow for CI)."""
    param_dtype: str = "fp32"
    """Parameter/compute dtype under ZeRO-3 mixed precision (fp32, bf16)."""
    reduce_dtype: str = "fp32"
    """Gradient reduction dtype."""
    cpu_offload: bool = False
    """Offload sharded params/grads/optimizer state to CPU (native: FSDP2 CPUOffloadPolicy, CUDA only;
    a no-op on CPU)."""
    fp8: Fp8Config = field(default_factory=Fp8Config)
    """FP8 training of the linear layers (native engine): parallel.fp8.recipe, emulate, exclude."""
    engine_options: dict[str, str] = field(default_factory=dict)
    """Extra engine-specific options (e.g. DeepSpeed offload_nvme_path)."""
