"""Layout rules that need the world size (config-only ones: llmtrain.config.rules; engine limits: each
engine).

`build_dims(cfg, world_size)` is what a launcher or tool calls to learn, before any model is built,
whether a config can run on a given number of ranks; the native engine calls `check_layout` again.
"""

from llmtrain.config import Config, ConfigError, batch_geometry
from llmtrain.config.rules import LOOPED_MULTI_STAGE, check_zero_shards, min_pipeline_microbatches
from llmtrain.parallel.dims import ParallelDims


def build_dims(cfg: Config, world_size: int) -> ParallelDims:
    """ParallelDims for `world_size` ranks, with every layout rule checked (ConfigError otherwise)."""
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world_size, ep=p.ep, cp=p.cp)
    check_layout(cfg, dims)
    return dims


def pipeline_microbatches(cfg: Config, dims: ParallelDims) -> int:
    """Micro-batches per pipeline step: explicit, or one per loader micro-batch (the accumulation count)."""
    return cfg.parallel.pp_microbatches or batch_geometry(cfg, dims.dp)


def check_layout(cfg: Config, dims: ParallelDims) -> None:
    """Rules tying the layout to the world size and the batch geometry; messages name the keys."""
    p = cfg.parallel
    if p.dp_shard == -1:  # an explicit dp_shard was checked with the config (config/rules.py)
        check_zero_shards(p.zero_stage, dims.dp_shard, dims.world_size)
    if p.zero_stage > 0 and not dims.dp_shard_enabled and dims.dp_replicate_enabled:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} shards over parallel.dp_shard, which is 1 while "
            f"parallel.dp_replicate={dims.dp_replicate}: set dp_shard=-1 (ZeRO) or dp_shard>1 (HSDP)"
        )
    if dims.ep != p.ep or dims.dp % dims.ep:
        raise ConfigError(
            f"parallel.ep={p.ep} is carved from the data-parallel ranks and must divide dp = "
            f"parallel.dp_replicate={dims.dp_replicate} x parallel.dp_shard={dims.dp_shard} = {dims.dp} "
            f"(world size {dims.world_size} = dp x parallel.tp={dims.tp} x parallel.pp={dims.pp})"
        )
    accum = batch_geometry(cfg, dims.dp)
    if not dims.pp_enabled:
        return
    n_mb = pipeline_microbatches(cfg, dims)
    rows = cfg.trainer.micro_batch_size * accum
    key = (
        "parallel.pp_microbatches"
        if p.pp_microbatches
        else "the accumulation count (parallel.pp_microbatches unset)"
    )
    least, why = min_pipeline_microbatches(p.pp_schedule, dims.pp)
    if p.pp_microbatches is None and n_mb < least:  # an explicit count was checked with the config
        raise ConfigError(
            f"{key} = {n_mb} pipeline micro-batches is fewer than {least} with parallel.pp={dims.pp} and "
            f"parallel.pp_schedule={p.pp_schedule} ({why}); raise trainer.global_batch_size or set "
            "parallel.pp_microbatches"
        )
    if rows % n_mb:
        raise ConfigError(
            f"each pipeline rank gets trainer.micro_batch_size x accumulation = {rows} sequences per step, "
            f"not divisible into {key} = {n_mb} micro-batches"
        )
    val_rows = cfg.trainer.val_batches * cfg.trainer.micro_batch_size
    if val_rows % n_mb:
        raise ConfigError(
            f"validation runs trainer.val_batches x trainer.micro_batch_size = {val_rows} sequences per "
            f"rank through the pipeline, not divisible into {key} = {n_mb} micro-batches; change trainer.val_batches"
        )
    if p.pp_schedule in LOOPED_MULTI_STAGE:
        rounds = max(1, n_mb // dims.pp)
        if n_mb % rounds:
            raise ConfigError(
                f"parallel.pp_schedule={p.pp_schedule} needs the {n_mb} micro-batches to be a multiple of "
                f"{rounds} rounds (micro-batches // parallel.pp); use a multiple of parallel.pp={dims.pp}"
            )
