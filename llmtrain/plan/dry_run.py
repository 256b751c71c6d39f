"""Dry runs: one process plays rank r of an N-rank job on torch's fake process group.

The fake backend (`torch.testing._internal.distributed.fake_pg`) accepts every collective and returns
at once without moving data, so meshes, DTensor placements, FSDP2 shards and pipeline splits are
built by the real engine code (`build_engine`) exactly as on rank r of the real job, and real
forward, backward and optimizer steps run on that rank's shard. Values after a collective are
meaningless; shapes, allocations, the collective schedule and its sizes are the real ones. Each
rank's report sets the measured set-up time, memory and traffic next to the planner's model
(llmtrain/plan/memory.py, comm.py). docs/dry_run.md has the tool and the measured cases.
"""

import dataclasses
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch import nn

from llmtrain.config import Config, batch_geometry
from llmtrain.data.loader import Batch
from llmtrain.models import model_args
from llmtrain.parallel.build import build_engine
from llmtrain.parallel.dims import MESH_ORDER, ParallelDims
from llmtrain.parallel.layout import build_dims
from llmtrain.plan.comm import comm_volume
from llmtrain.plan.dry_run_record import Progress, StepRecorder, ddp_counting_hook, timed_phases
from llmtrain.plan.fake_pipeline import make_static
from llmtrain.plan.fit import layout_from_config
from llmtrain.plan.measure import PeakTensorMemory
from llmtrain.plan.memory import GIB, MemoryEstimate, estimate_stage, total_params
from llmtrain.train.flops import flops_per_token

SMALL_MODEL = [
    "model.dim=256",
    "model.n_layers=4",
    "model.n_heads=8",
    "model.n_kv_heads=8",
    "model.vocab_size=512",
    "model.ffn_dim=768",
    "data.seq_len=256",
    "trainer.micro_batch_size=2",
]
"""Overrides of a model whose steps take seconds on a CPU at any fake world: the CI test and
`bench/dry_run.py --small` compare the measured memory and traffic with the planner on it."""

CPU_TFLOPS = 0.05
"""Sustained fp32 matmul throughput assumed for one CPU process, to decide which steps are too slow."""


@contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """The default process group as rank `rank` of `world_size` on the fake backend (torch's own
    test helper, imported lazily), destroyed on exit so the next rank can be built."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized; a dry run needs its own fake one")
    if not 0 <= rank < world_size:
        raise ValueError(f"dry run rank {rank} is outside the world of {world_size} ranks")
    _clear_dtensor_caches()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    """DTensor caches sharding decisions keyed by meshes that compare equal across ranks (same shape
    and names), so without this rank 1 built after rank 0 in one process would get output specs (and
    coordinates) of rank 0's mesh, e.g. from `to_empty`'s empty_like."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._redistribute import _gen_transform_infos
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()  # the Python and the C++ fast-path caches
    DTensor._op_dispatcher.sharding_propagator._propagate_tensor_meta_cached.cache_clear()
    _gen_transform_infos.cache_clear()


@dataclass(kw_only=True)
class DryRunOptions:
    steps: int = 2
    """Optimizer steps to run (the last one is measured; 2 = one warm-up that allocates AdamW state)."""
    max_step_tflop: float = 2.0
    """Skip the steps when one would take more than this many TFLOP on this rank (CPU time)."""
    meta: bool | None = None
    """Parameters on the meta device (no storage, no steps); None: when the shard would not fit here."""
    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8
    progress: Progress | None = None


@dataclass(kw_only=True)
class RankReport:
    """Everything measured for one rank, next to the planner's model (bytes, seconds)."""

    rank: int
    world: int
    layout: str
    coords: dict[str, int]
    phases: dict[str, float]
    params_local: int
    params_global: int
    memory: dict[str, float]
    planned_memory: dict[str, float]
    collectives: dict[str, dict[str, dict[str, float]]]
    planned_comm: dict[str, float]
    checkpoint: dict[str, int]
    steps_run: int
    notes: list[str] = field(default_factory=list)
    verdict: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def group_kinds(dims: ParallelDims, mesh: Any) -> dict[str, str]:
    """Process-group name -> the mesh dimension it spans ("tp", "dp_shard", "dp", ...)."""
    kinds = {dist.group.WORLD.group_name: "world"}
    for name in MESH_ORDER:
        if getattr(dims, name) > 1:
            kinds[mesh[name].get_group().group_name] = name
    if dims.dp_enabled:  # the flattened dp mesh: token counts, loss sums (HSDP: both dims)
        kinds.setdefault(dims.dp_mesh.get_group().group_name, "dp")
    if dims.cp_enabled:  # ZeRO over dp_shard x cp, gradient/loss sums over dp x cp
        kinds.setdefault(dims.fsdp_mesh.get_group().group_name, "dp")
        kinds.setdefault(dims.dp_cp_mesh.get_group().group_name, "dp")
    if dims.ep_enabled:  # token all-to-alls; expert gradients (edp)
        for name in ("ep", "edp"):
            kinds.setdefault(dims.expert_mesh[name].get_group().group_name, name)
    return kinds


def _batches(cfg: Config, accum: int, gen: torch.Generator, device: torch.device) -> list[Batch]:
    """Random token micro-batches of the configured shape (the traffic does not depend on values)."""
    mbs, seq, vocab = cfg.trainer.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    toks = torch.randint(0, vocab, (accum, mbs, seq + 1), generator=gen).to(device)
    return [Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in toks]


def _local_bytes(tensors: Iterator[torch.Tensor]) -> tuple[int, int]:
    """(elements, bytes) of the distinct local storages behind `tensors` (DTensors: their shard)."""
    seen, numel, nbytes = set(), 0, 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.untyped_storage()._cdata, local.storage_offset()) if not local.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        numel += local.numel()
        nbytes += local.numel() * local.element_size()
    return numel, nbytes


def _planned(
    cfg: Config, world: int, dims: ParallelDims, coords: dict[str, int]
) -> tuple[MemoryEstimate, dict]:
    """The planner's memory of this rank's pipeline stage and its traffic per step, by kind."""
    args, seq, accum = model_args(cfg.model), cfg.data.seq_len, batch_geometry(cfg, dims.dp)
    layout = layout_from_config(cfg, world)
    stage = "first" if dims.pp > 1 and coords["pp"] < dims.pp - 1 else "last"
    est = estimate_stage(args, seq, layout, cfg.trainer.precision, accum, stage)
    parts = comm_volume(args, seq, layout, accum, 8, cfg.trainer.precision)
    return est, {k: p.bytes for k, p in parts.items()}


def _step_skip_reason(
    cfg: Config, dims: ParallelDims, opts: DryRunOptions, meta: bool, est: MemoryEstimate
) -> str | None:
    """Why the steps cannot run here (None: they can)."""
    if opts.steps <= 0:
        return "steps not requested (--steps 0)"
    if meta:
        return "parameters on meta (--meta, or the shard would not fit this machine): no steps"
    if dims.ep_enabled:
        return (
            "ep > 1: the token dispatch sizes its all-to-all from exchanged expert counts, values the "
            "fake group does not carry; set-up, memory plan and checkpoint plan only"
        )
    if est.total > 0.5 * psutil.virtual_memory().available:
        return f"a step's planned peak {est.total / GIB:.1f} GiB exceeds half of this machine's free memory"
    args = model_args(cfg.model)
    tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len * batch_geometry(cfg, dims.dp)
    tflop = flops_per_token(args, cfg.data.seq_len) * tokens / (dims.tp * dims.pp) / 1e12
    if tflop > opts.max_step_tflop:
        return (
            f"one step is ~{tflop:.0f} TFLOP on this rank (~{tflop / CPU_TFLOPS / 60:.0f} min on this "
            f"CPU) > --max-step-tflop {opts.max_step_tflop:g}: steps skipped"
        )
    return None


def _needs_meta(est: MemoryEstimate) -> bool:
    """Whether the resident shard (weights, gradients, optimizer state) would not fit in half of this
    machine's available memory."""
    return est.weights + est.grads + est.optimizer > 0.5 * psutil.virtual_memory().available


def dry_run_rank(cfg: Config, world: int, rank: int, opts: DryRunOptions) -> RankReport:
    """Build rank `rank` of a `world`-rank job with the real engine, step it, and report."""
    dims = build_dims(cfg, world)
    coords = dims.coords(rank)
    est, planned_comm = _planned(cfg, world, dims, coords)
    meta = _needs_meta(est) if opts.meta is None else opts.meta
    device = torch.device("meta" if meta else "cpu")
    phases: dict[str, float] = {}
    notes: list[str] = []
    say = opts.progress or (lambda _msg: None)
    with fake_world(rank, world):
        t0 = time.perf_counter()
        mesh = dims.build_mesh("cpu")
        phases["mesh"] = time.perf_counter() - t0
        say(f"rank {rank}: mesh {phases['mesh']:.1f}s; building the engine ...")
        rss_before = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        with timed_phases(phases, lambda m: say(f"rank {rank}: {m}")), PeakTensorMemory() as build_mem:
            engine = build_engine(cfg, dims, mesh, device)
        phases["engine total"] = time.perf_counter() - t0
        say(f"rank {rank}: engine built in {phases['engine total']:.1f}s")
        params_local, param_bytes = _local_bytes(engine.model.parameters())
        memory = {"params": float(param_bytes), "build peak": float(build_mem.peak)}
        memory["buffers"] = float(_local_bytes(engine.model.buffers())[1])
        memory["rss after build"] = float(psutil.Process().memory_info().rss)
        memory["rss growth in build"] = memory["rss after build"] - rss_before
        skip = _step_skip_reason(cfg, dims, opts, meta, est)
        recorder = None
        if skip is None:
            if dims.pp_enabled:
                make_static(engine, cfg, dims)
            recorder, steps_run = _run_steps(engine, cfg, dims, mesh, opts, memory, say, rank)
        else:
            steps_run = 0
            notes.append(skip)
        checkpoint = _save_plan(engine, rank, world)
    collectives = _collective_table(recorder)
    report = RankReport(
        rank=rank,
        world=world,
        layout=dims.describe() + f" zero_stage={cfg.parallel.zero_stage}",
        coords=coords,
        phases=phases,
        params_local=params_local,
        params_global=total_params(model_args(cfg.model)),
        memory=memory,
        planned_memory={**{k: v * GIB for k, v in est.as_gib().items()}},
        collectives=collectives,
        planned_comm=planned_comm,
        checkpoint=checkpoint,
        steps_run=steps_run,
        notes=notes
        + sorted(f"uncounted collective op {op}" for op in (recorder.unknown if recorder else ())),
    )
    report.verdict = verdict(report, opts.gpu_memory_gb)
    return report


def _run_steps(
    engine: Any,
    cfg: Config,
    dims: ParallelDims,
    mesh: Any,
    opts: DryRunOptions,
    memory: dict,
    say: Progress,
    rank: int,
) -> tuple[StepRecorder, int]:
    """Run `opts.steps` optimizer steps; the last one is recorded (collectives, peak, gradients)."""
    accum = batch_geometry(cfg, dims.dp)
    gen = torch.Generator().manual_seed(rank)
    kinds = group_kinds(dims, mesh)
    recorder = StepRecorder(kinds)
    if isinstance(engine.model, nn.parallel.DistributedDataParallel):
        engine.model.register_comm_hook(None, ddp_counting_hook(recorder, "dp", dims.dp))
    grads: list[float] = []
    hook = engine.optimizer.register_step_pre_hook(
        lambda *_: grads.append(
            float(_local_bytes(p.grad for p in engine.model.parameters() if p.grad is not None)[1])
        )
    )
    for i in range(opts.steps):
        batches = _batches(cfg, accum, gen, torch.device("cpu"))
        t0 = time.perf_counter()
        last = i == opts.steps - 1
        if last:
            recorder.collectives.clear()
            recorder.exclude(_resident(engine))
            with recorder:
                engine.train_step(batches, 1e-4)
        else:
            engine.train_step(batches, 1e-4)
        say(f"rank {rank}: step {i + 1}/{opts.steps} {time.perf_counter() - t0:.1f}s")
    hook.remove()
    state = (
        t
        for s in engine.optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.dim()
    )
    memory["optimizer"] = float(_local_bytes(state)[1])
    memory["grads"] = grads[-1] if grads else 0.0
    memory["step peak"] = float(recorder.peak)
    memory["largest collective buffer"] = float(
        max((s.largest for ops in recorder.collectives.values() for s in ops.values()), default=0)
    )
    steady = opts.steps > 1  # the optimizer state existed before the measured step
    memory["total"] = memory["params"] + memory["buffers"] + memory["step peak"]
    memory["total"] += memory["optimizer"] if steady else 0.0
    return recorder, opts.steps


def _resident(engine: Any) -> Iterator[torch.Tensor]:
    """Tensors alive between steps: parameters, buffers, optimizer state (and DDP's buckets)."""
    yield from engine.model.parameters()
    yield from engine.model.buffers()
    for state in engine.optimizer.state.values():
        yield from (t for t in state.values() if isinstance(t, torch.Tensor))


def _save_plan(engine: Any, rank: int, world: int) -> dict[str, int]:
    """DCP's save plan for this rank's checkpoint state (the engine's own state dict): items it
    writes, and the pickled size of its entries in the global metadata (rank 0 writes the
    `.metadata` file holding every rank's entries: about `world` x this for fully sharded state)."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    state = engine._checkpoint_state() if hasattr(engine, "_checkpoint_state") else {}
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, storage_meta=None, is_coordinator=True)
    local = planner.create_local_plan()
    _, metadata = planner.create_global_plan([local])
    size = len(pickle.dumps(metadata))
    return {"items": len(local.items), "metadata_bytes": size, "metadata_bytes_all_ranks_est": size * world}


def _collective_table(recorder: StepRecorder | None) -> dict[str, dict[str, dict[str, float]]]:
    if recorder is None:
        return {}
    return {
        kind: {op: dataclasses.asdict(stat) for op, stat in sorted(ops.items())}
        for kind, ops in sorted(recorder.collectives.items())
    }


PLANNER_KIND = {
    "dp_shard": "dp",
    "dp": "dp",
    "dp_replicate": "dp_replicate",
    "tp": "tp",
    "pp": "pp",
    "cp": "cp",
    "ep": "ep",
}
"""Measured group kind -> the planner's traffic kind (llmtrain/plan/comm.py)."""


def measured_comm(report: RankReport) -> dict[str, float]:
    """Bytes sent per step by planner kind (bookkeeping on the world group is left out)."""
    out: dict[str, float] = {}
    for kind, ops in report.collectives.items():
        if kind in PLANNER_KIND:
            key = PLANNER_KIND[kind]
            out[key] = out.get(key, 0.0) + sum(op["bytes"] for op in ops.values())
    return out


def verdict(report: RankReport, gpu_memory_gb: float) -> str:
    """One line: fits or not in `gpu_memory_gb`, the total used (measured when the step ran, else
    the planner's), and which category dominates."""
    plan = report.planned_memory
    measured = report.steps_run > 0
    total = report.memory["total"] if measured else plan["total"]
    cats = {
        "parameters": report.memory["params"] if measured else plan["weights"],
        "optimizer state": report.memory.get("optimizer", plan["optimizer"]),
        "gradients": report.memory.get("grads", plan["grads"]),
        "activations (step peak)": report.memory.get("step peak", plan["dynamic"]),
        "buffers": plan["buffers"],
    }
    dominant, amount = max(cats.items(), key=lambda kv: kv[1])
    budget = gpu_memory_gb * GIB
    word = "fits" if total <= budget else "does NOT fit"
    source = "measured" if measured else "planned"
    return (
        f"rank {report.rank}: {word} {gpu_memory_gb:g} GiB ({source} peak {total / GIB:.2f} GiB, "
        f"{100 * total / budget:.0f}%); dominant: {dominant} {amount / GIB:.2f} GiB"
    )


MEMORY_ROWS = (
    ("parameters", "params", "weights"),
    ("gradients", "grads", "grads"),
    ("optimizer state", "optimizer", "optimizer"),
    ("buffers (rope)", "buffers", None),
    ("largest collective buffer", "largest collective buffer", None),
    ("activation peak (step)", "step peak", None),
    ("total", "total", "total"),
)


def format_report(r: RankReport) -> str:
    """The compact console table of one rank: phases, memory vs plan, traffic vs plan, checkpoint."""
    mib = 1024**2
    lines = [f"rank {r.rank}/{r.world} {r.layout} coords {r.coords}"]
    lines.append("  set-up: " + ", ".join(f"{k} {v:.2f}s" for k, v in r.phases.items()))
    share = r.params_global / r.params_local if r.params_local else 0.0
    lines.append(f"  parameters: {r.params_local:,} local of {r.params_global:,} (1/{share:.1f})")
    mem = r.memory
    lines.append(
        f"  build: peak tensor memory {mem['build peak'] / mib:.1f} MiB = "
        f"{mem['build peak'] / max(mem['params'], 1):.2f}x the local shard; "
        f"process RSS {mem['rss after build'] / mib:.0f} MiB (+{mem['rss growth in build'] / mib:.0f} in the build)"
    )
    plan = dict(r.planned_memory)
    rope = r.memory["buffers"]  # the planner's buffers = the RoPE table + ZeRO's unsharded blocks
    plan["step peak"] = plan["dynamic"] + plan["buffers"] - rope
    plan["largest collective buffer"] = plan["buffers"] - rope or None
    plan["buffers"] = rope
    lines.append(f"  {'memory (MiB)':<28}{'measured':>12}{'planned':>12}{'ratio':>8}")
    for label, key, plan_key in MEMORY_ROWS:
        got = r.memory.get(key)
        want = plan.get(plan_key or key)
        ratio = f"{got / want:.2f}" if got is not None and want else ""
        cells = [f"{got / mib:>12.1f}" if got is not None else f"{'-':>12}"]
        cells.append(f"{want / mib:>12.1f}" if want is not None else f"{'-':>12}")
        lines.append(f"  {label:<28}{''.join(cells)}{ratio:>8}")
    lines.append(f"  {'traffic per step (MiB sent)':<28}{'measured':>12}{'planned':>12}  collectives")
    got = measured_comm(r)
    for kind in sorted(set(got) | set(r.planned_comm)):
        ops = [
            (op, st) for k, v in r.collectives.items() if PLANNER_KIND.get(k) == kind for op, st in v.items()
        ]
        detail = ", ".join(f"{op} x{int(st['count'])}" for op, st in ops)
        cell = f"{got[kind] / mib:>12.2f}" if kind in got else f"{'-':>12}"
        lines.append(f"  {kind:<28}{cell}{r.planned_comm.get(kind, 0.0) / mib:>12.2f}  {detail}")
    for kind in ("world", "other"):
        ops = r.collectives.get(kind, {})
        if ops:
            counts = ", ".join(f"{op} x{int(st['count'])}" for op, st in ops.items())
            lines.append(f"  {kind + ' (bookkeeping)':<28}{counts}")
    ck = r.checkpoint
    lines.append(
        f"  checkpoint save plan: {ck['items']} items, {ck['metadata_bytes'] / 1024:.1f} KiB of metadata "
        f"(all ranks ~{ck['metadata_bytes_all_ranks_est'] / mib:.1f} MiB)"
    )
    lines += [f"  note: {n}" for n in r.notes]
    lines.append(f"  verdict: {r.verdict}")
    return "\n".join(lines)
