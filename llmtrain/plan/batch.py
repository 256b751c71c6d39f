"""Batch geometry that fits a layout: the planner suggests it instead of stopping.

A layout's batch rules (llmtrain.parallel.layout.check_layout) are all divisibility rules on
trainer.global_batch_size, trainer.micro_batch_size and trainer.val_batches. A user asking "will
8b fit on 64 GPUs?" with the default batch of 32 should get the estimate, plus the exact overrides
that make the run legal, not a refusal. Everything else in the layout (degrees, ZeRO, schedules)
is still checked by the engine's own `build_dims` afterwards.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from llmtrain.parallel.dims import ParallelDims


@dataclass(kw_only=True)
class BatchFit:
    """A legal (global batch, micro-batch, val_batches) for a layout and what changed."""

    global_batch_size: int
    micro_batch_size: int
    val_batches: int
    notes: list[str]


def _pipeline_ok(mbs: int, accum: int, pp: int, n_mb: int | None) -> bool:
    """Rows per pipeline rank split into >= pp micro-batches (the accumulation count by default)."""
    if pp == 1:
        return True
    n = n_mb or accum
    return n >= pp and (mbs * accum) % n == 0


def fit_batch(
    global_batch: int, micro_batch: int, val_batches: int, dp: int, pp: int, pp_microbatches: int | None
) -> BatchFit:
    """The nearest batch geometry the layout accepts. Keeps global_batch when a micro-batch <= the
    configured one divides it (the largest such); otherwise raises global_batch to the smallest
    legal one (a multiple of micro-batch x dp giving a pipeline >= pp micro-batches), with the
    largest micro-batch <= the configured one that reaches it. val_batches is
    raised to the next value whose rows divide into the pipeline micro-batches."""
    notes: list[str] = []
    gbs, mbs = global_batch, micro_batch
    if not _legal(gbs, mbs, dp, pp, pp_microbatches):
        kept = [m for m in range(mbs, 0, -1) if _legal(gbs, m, dp, pp, pp_microbatches)]
        raised, raised_mbs = min((_raise(gbs, m, dp, pp, pp_microbatches), -m) for m in range(1, mbs + 1))
        raised_mbs = -raised_mbs
        why = f"trainer.global_batch_size={gbs} does not split into trainer.micro_batch_size={mbs} x dp {dp}"
        why += f" x accumulation (>= parallel.pp={pp} pipeline micro-batches)" if pp > 1 else ""
        if kept:
            notes.append(
                f"{why}: estimating with trainer.micro_batch_size={kept[0]} (keeps the batch), "
                f"or set trainer.global_batch_size={_raise(gbs, mbs, dp, pp, pp_microbatches)}"
            )
            mbs = kept[0]
        else:
            change = f"trainer.global_batch_size={raised}"
            if raised_mbs != mbs:
                change += f" trainer.micro_batch_size={raised_mbs}"
            notes.append(f"{why}: estimating with {change}")
            gbs, mbs = raised, raised_mbs
    vb = val_batches
    if pp > 1:
        n_mb = pp_microbatches or gbs // (mbs * dp)
        unit = n_mb // math.gcd(mbs, n_mb)  # val_batches x mbs must be a multiple of n_mb
        vb = -(-val_batches // unit) * unit
        if vb != val_batches:
            notes.append(
                f"trainer.val_batches={val_batches} x trainer.micro_batch_size={mbs} does not split into "
                f"{n_mb} pipeline micro-batches: use trainer.val_batches={vb}"
            )
    return BatchFit(global_batch_size=gbs, micro_batch_size=mbs, val_batches=vb, notes=notes)


def _raise(gbs: int, mbs: int, dp: int, pp: int, n_mb: int | None) -> int:
    """The smallest legal global batch >= gbs for micro-batch `mbs`."""
    step = mbs * dp
    return next(k * step for k in range(-(-gbs // step), 1 << 20) if _legal(k * step, mbs, dp, pp, n_mb))


def _legal(gbs: int, mbs: int, dp: int, pp: int, n_mb: int | None) -> bool:
    return gbs % (mbs * dp) == 0 and _pipeline_ok(mbs, gbs // (mbs * dp), pp, n_mb)


def fit_config_batch(cfg: Any, world: int) -> tuple[Any, list[str]]:
    """`cfg` with its trainer batch keys replaced by `fit_batch`'s answer for `world` ranks, and the
    notes to print. Degrees that cannot fill `world` raise the engine's ConfigError unchanged."""
    p, t = cfg.parallel, cfg.trainer
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world, cp=p.cp)
    fit = fit_batch(
        t.global_batch_size, t.micro_batch_size, t.val_batches, dims.dp, dims.pp, p.pp_microbatches
    )
    trainer = dataclasses.replace(
        t,
        global_batch_size=fit.global_batch_size,
        micro_batch_size=fit.micro_batch_size,
        val_batches=fit.val_batches,
    )
    return dataclasses.replace(cfg, trainer=trainer), fit.notes
