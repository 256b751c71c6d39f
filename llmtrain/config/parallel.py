"""Parallel layout schema: dp_replicate x dp_shard x pp x tp = world size."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmtrain.config.schema import Config

BACKENDS = ("native", "deepspeed", "megatron")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
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
    zero_stage: int = 0
    """0 = DDP; 1 = sharded optimizer state; 2 = + sharded grads; 3 = + sharded params (FSDP2).
    Stages 1-3 shard over dp_shard (HSDP when dp_replicate > 1 too); dp_shard > 1 needs stage >= 1."""
    sequence_parallel: bool = True
    """With tp > 1, shard norm/residual activations along the sequence."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved_1f1b."""
    pp_microbatches: int | None = None
    """Pipeline micro-batches per step (>= pp); None = the gradient-accumulation count, i.e. one
    pipeline micro-batch per trainer.micro_batch_size sequences."""
    pp_virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved_1f1b needs >= 2)."""
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
    engine_options: dict[str, str] = field(default_factory=dict)
    """Extra engine-specific options (e.g. DeepSpeed offload_nvme_path)."""


def check_parallel_config(cfg: "Config") -> None:
    """World-size-independent layout rules (the world-size ones live in llmtrain.parallel.layout).

    Every message names the config keys involved, so an impossible layout fails before a rank starts.
    """
    from llmtrain.config.validate import ConfigError
    from llmtrain.models.build import model_args

    p, m = cfg.parallel, model_args(cfg.model)
    for key in ("tp", "pp", "pp_virtual_stages"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(p, key)} must be >= 1")
    for key in ("dp_replicate", "dp_shard"):
        if getattr(p, key) == 0 or getattr(p, key) < -1:
            raise ConfigError(f"parallel.{key}={getattr(p, key)} must be >= 1 or -1 (fill the world)")
    tp_divides = {
        "model.n_heads": m.n_heads,
        "model.n_kv_heads": m.kv_heads,
        "model.ffn_dim": m.hidden_dim,
        "model.vocab_size": m.vocab_size,
    }
    for key, value in tp_divides.items():
        if value % p.tp:
            hint = (
                " (KV-head replication across tp ranks is not implemented)"
                if key.endswith("kv_heads")
                else ""
            )
            raise ConfigError(f"{key}={value} must be divisible by parallel.tp={p.tp}{hint}")
    if p.tp > 1 and p.sequence_parallel and cfg.data.seq_len % p.tp:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must be divisible by parallel.tp={p.tp} with "
            "parallel.sequence_parallel=true"
        )
    if m.tie_embeddings and (p.tp > 1 or p.pp > 1):
        raise ConfigError(
            "model.tie_embeddings=true is not supported with parallel.tp > 1 or parallel.pp > 1"
        )
    interleaved = p.pp_schedule == "interleaved_1f1b"
    if p.pp > 1 and interleaved and p.pp_virtual_stages < 2:
        raise ConfigError("parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2")
    if p.pp > 1 and not interleaved and p.pp_virtual_stages != 1:
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule} runs one stage per rank: "
            "set parallel.pp_virtual_stages=1 (or pp_schedule=interleaved_1f1b)"
        )
    if p.pp > 1:
        from llmtrain.parallel.pipeline import stage_layer_counts

        stage_layer_counts(m.n_layers, p.pp * p.pp_virtual_stages, p.pp_layers_per_stage)
        if p.pp_microbatches is not None and p.pp_microbatches < p.pp:
            raise ConfigError(
                f"parallel.pp_microbatches={p.pp_microbatches} must be >= parallel.pp={p.pp} "
                "(fewer micro-batches than stages leaves stages idle; 1F1B rejects it)"
            )
    if p.zero_stage == 0 and p.dp_shard not in (1, -1):
        raise ConfigError(
            f"parallel.dp_shard={p.dp_shard} shards parameters/optimizer state, which needs "
            "parallel.zero_stage 1, 2 or 3 (zero_stage=0 is DDP over parallel.dp_replicate)"
        )
    if p.backend == "native" and p.zero_stage == 0 and p.param_dtype != "fp32":
        raise ConfigError(
            f"parallel.param_dtype={p.param_dtype} is applied by ZeRO/FSDP2 only; with "
            "parallel.zero_stage=0 use trainer.precision=bf16 (autocast) instead"
        )
