"""Fit planner: params, per-GPU memory, FLOPs and time for a config on a cluster, and layouts that fit.

Time model: a step does `flops_per_token(recompute) x global tokens` hardware FLOPs at an assumed
`mfu` of the cluster's peak, stretched by 1 / (1 - pipeline bubble) (llmtrain/plan/pipeline.py, per
schedule: 1F1B's is (pp - 1) / (microbatches + pp - 1)), plus the communication that compute does not
hide (llmtrain/plan/comm.py: bytes per rank at the intra- or inter-node bus bandwidth;
data-parallel/ZeRO traffic overlaps with the backward, 2/3 of compute; tp and pp traffic is on the
critical path). The search keeps tp inside a node, and tries context parallelism (cp; not with HSDP,
which the native engine refuses with it) for sequences of at least `CP_MIN_SEQ` tokens.
"""

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from llmtrain.models.llama import TransformerArgs
from llmtrain.plan.comm import comm_time_s, comm_volume
from llmtrain.plan.memory import GIB, Layout, MemoryEstimate, estimate_memory, total_params
from llmtrain.plan.pipeline import bubble_fraction
from llmtrain.train.flops import flops_per_token, recompute_fraction

AC_CHOICES = ("none", "selective", "full")
CP_MIN_SEQ = 16384
"""Shorter sequences are not searched with cp (their activations fit without splitting the sample)."""


@dataclass(kw_only=True)
class Cluster:
    """What the job runs on."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    peak_tflops: float = 989.4
    mfu: float = 0.4
    """Assumed model FLOPs utilization without recompute or pipeline bubble."""
    headroom: float = 0.1
    """Share of GPU memory kept free for the CUDA context, NCCL buffers and fragmentation."""
    intra_node_gbps: float = 360.0
    """Collective bus bandwidth inside a node, GB/s (NCCL all-reduce on 8 H100 SXM over NVLink 4)."""
    inter_node_gbps: float = 40.0
    """Collective bus bandwidth per GPU across nodes, GB/s (one 400 Gb/s NIC per GPU)."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gib * GIB * (1 - self.headroom)


@dataclass(kw_only=True)
class Plan:
    """One layout's estimate."""

    layout: Layout
    grad_accum: int
    memory: MemoryEstimate
    fits: bool
    model_flops_per_step: float
    hw_flops_per_step: float
    step_time_s: float
    tokens_per_s: float
    mfu: float
    comm_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
    """Bytes one rank sends per step, by kind (dp, dp_replicate, tp, pp)."""
    comm_s: float = 0.0
    """Time of all that traffic at the assumed bandwidths."""
    comm_exposed_s: float = 0.0
    """The part of comm_s that the step waits for (included in step_time_s)."""

    def overrides(self) -> str:
        """The command-line overrides that select this layout."""
        lo = self.layout
        return (
            f"parallel.dp_replicate={lo.dp_replicate} parallel.dp_shard={lo.dp_shard} parallel.tp={lo.tp} "
            f"parallel.pp={lo.pp} parallel.cp={lo.cp} parallel.zero_stage={lo.zero_stage} "
            f"parallel.activation_checkpoint={lo.activation_checkpoint} trainer.micro_batch_size={lo.micro_batch_size}"
        )


def layout_from_config(cfg: Any, world: int) -> Layout:
    """The config's parallel.* and trainer.micro_batch_size, with -1 degrees filled for `world`;
    the engine's own layout rules are checked (ConfigError, a ValueError, names the keys)."""
    from llmtrain.parallel.layout import build_dims

    p = cfg.parallel
    dims = build_dims(cfg, world)
    return Layout(
        dp_replicate=dims.dp_replicate,
        dp_shard=dims.dp_shard,
        tp=dims.tp,
        pp=dims.pp,
        ep=dims.ep,
        cp=dims.cp,
        zero_stage=p.zero_stage,
        activation_checkpoint=p.activation_checkpoint,
        sequence_parallel=p.sequence_parallel,
        pp_schedule=p.pp_schedule,
        pp_microbatches=p.pp_microbatches,
        pp_virtual_stages=p.pp_virtual_stages,
        param_dtype=p.param_dtype,
        reduce_dtype=p.reduce_dtype,
        micro_batch_size=cfg.trainer.micro_batch_size,
    )


def plan_layout(
    args: TransformerArgs, seq_len: int, global_batch: int, layout: Layout, cluster: Cluster, precision: str
) -> Plan:
    """Memory, FLOPs and time of one layout (global_batch sequences per optimizer step)."""
    per_step = layout.micro_batch_size * layout.dp
    if global_batch % per_step:
        raise ValueError(
            f"trainer.global_batch_size={global_batch} must be divisible by trainer.micro_batch_size="
            f"{layout.micro_batch_size} x data-parallel size {layout.dp}"
        )
    accum = global_batch // per_step
    mem_layout = layout
    if layout.pp > 1:  # the engine pipelines mbs x accum rows per step in pp_microbatches (default accum)
        n_mb = layout.pp_microbatches or accum
        rows = layout.micro_batch_size * accum
        if n_mb < layout.pp or rows % n_mb:
            raise ValueError(
                f"parallel.pp_microbatches={n_mb} must be >= parallel.pp={layout.pp} and divide {rows}"
            )
        layout = dataclasses.replace(layout, pp_microbatches=n_mb)
        mem_layout = dataclasses.replace(layout, micro_batch_size=rows // n_mb)
    mem = estimate_memory(args, seq_len, mem_layout, precision=precision, grad_accum=accum)
    tokens = global_batch * seq_len
    model = flops_per_token(args, seq_len) * tokens
    hw = (
        flops_per_token(args, seq_len, recompute_fraction(layout.activation_checkpoint, args.n_layers))
        * tokens
    )
    idle = bubble_fraction(
        layout.pp_schedule, layout.pp, layout.pp_microbatches or 1, layout.pp_virtual_stages
    )
    compute = hw / (1 - idle) / (layout.world * cluster.peak_tflops * 1e12 * cluster.mfu)
    parts = comm_volume(args, seq_len, layout, accum, cluster.gpus_per_node, precision)
    comm, exposed = comm_time_s(parts, compute, cluster.intra_node_gbps, cluster.inter_node_gbps)
    t = compute + exposed
    return Plan(
        layout=layout,
        grad_accum=accum,
        memory=mem,
        fits=mem.total <= cluster.usable_bytes,
        model_flops_per_step=model,
        hw_flops_per_step=hw,
        step_time_s=t,
        tokens_per_s=tokens / t,
        mfu=model / (t * layout.world * cluster.peak_tflops * 1e12),
        comm_bytes={k: p.bytes for k, p in parts.items()},
        comm_s=comm,
        comm_exposed_s=exposed,
    )


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def context_parallel_degrees(seq_len: int, world: int) -> list[int]:
    """cp degrees the search tries: 1, and for long sequences the powers of two that split it into
    2·cp equal chunks (data.seq_len % (2 cp) == 0) and divide the world."""
    if seq_len < CP_MIN_SEQ:
        return [1]
    return [c for c in (1, 2, 4, 8, 16, 32) if seq_len % (2 * c) == 0 and world % c == 0]


def candidate_layouts(
    args: TransformerArgs, global_batch: int, cluster: Cluster, cps: list[int] | None = None
) -> list[Layout]:
    """tp within a node (dividing the heads), pp up to n_layers, ZeRO 0-3 (and HSDP across nodes),
    every checkpointing mode and micro-batch sizes that divide the batch; each cp of `cps`, except
    with HSDP (the native engine refuses cp there)."""
    out = []
    tps = [t for t in _divisors(cluster.gpus_per_node) if args.n_heads % t == 0 and args.kv_heads % t == 0]
    for tp, pp, cp in itertools.product(tps, _divisors(cluster.world), cps or [1]):
        if cluster.world % (tp * pp * cp) or pp > args.n_layers:
            continue
        dp = cluster.world // (tp * pp * cp)
        shards = [(dp, 1, 0)] + [(1, dp, z) for z in (1, 2, 3)]
        in_node = cluster.gpus_per_node // tp
        if cluster.nodes > 1 and 1 < in_node < dp and dp % in_node == 0 and cp == 1:
            shards.append((dp // in_node, in_node, 3))  # HSDP: shard inside a node, replicate across
        for (rep, shard, z), ac in itertools.product(shards, AC_CHOICES):
            if dp * cp == 1 and z > 0:
                continue
            for mbs in _divisors(global_batch // dp) if global_batch % dp == 0 else []:
                accum = global_batch // (dp * mbs)
                if mbs > 16 or (pp > 1 and accum < pp):
                    continue
                out.append(
                    Layout(
                        dp_replicate=rep,
                        dp_shard=shard,
                        tp=tp,
                        pp=pp,
                        cp=cp,
                        zero_stage=z,
                        activation_checkpoint=ac,
                        micro_batch_size=mbs,
                    )
                )
    return out


def suggest_layouts(
    args: TransformerArgs, seq_len: int, global_batch: int, cluster: Cluster, precision: str, top: int = 8
) -> list[Plan]:
    """Fitting layouts, fastest first; for each (dp, tp, pp, ZeRO, checkpointing) only the largest
    micro-batch that fits (bigger GEMMs), ties broken towards less tp, pp and sharding."""
    best: dict[tuple, Plan] = {}
    cps = context_parallel_degrees(seq_len, cluster.world)
    for layout in candidate_layouts(args, global_batch, cluster, cps):
        plan = plan_layout(args, seq_len, global_batch, layout, cluster, precision)
        if not plan.fits:
            continue
        lo = layout
        key = (lo.dp_replicate, lo.dp_shard, lo.tp, lo.pp, lo.cp, lo.zero_stage, lo.activation_checkpoint)
        if key not in best or lo.micro_batch_size > best[key].layout.micro_batch_size:
            best[key] = plan
    order = lambda p: (round(p.step_time_s, 6), p.layout.tp, p.layout.pp, p.layout.zero_stage)
    return sorted(best.values(), key=order)[:top]


def describe_model(args: TransformerArgs) -> dict[str, float]:
    """Parameter counts for the report header."""
    return {
        "params": total_params(args),
        "params_non_embedding": total_params(args) - args.vocab_size * args.dim,
    }
