"""What a dry run measures while the real engine code runs on the fake process group: the time of
each set-up phase, live tensor memory, and every collective with the bytes this rank would send.

Collectives are seen where they enter torch's dispatcher (`c10d.*` ops from FSDP2, DDP and
pipelining, `_c10d_functional.*` ops from DTensor), whoever issued them, so nothing in the engine
is replaced. Bytes follow the planner's convention (llmtrain/plan/comm.py, NCCL's bus bandwidth):
an all-reduce of S bytes over n ranks sends 2 (n-1)/n S, an all-gather of a local chunk s (n-1) s,
a reduce-scatter of an input S (n-1)/n S, a send S.
"""

import importlib
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from llmtrain.plan.measure import PeakTensorMemory

Progress = Callable[[str], None]

# module attribute -> phase name; the native engine and parallelize look these up at call time
PHASES = {
    ("llmtrain.parallel.native", "build_model"): "build on meta",
    ("llmtrain.parallel.parallelize", "apply_tp"): "tensor parallel",
    ("llmtrain.parallel.parallelize", "apply_fsdp"): "fsdp/zero",
    ("llmtrain.parallel.parallelize", "materialize"): "materialize + init",
    ("llmtrain.parallel.native", "build_optimizer"): "optimizer",
    ("llmtrain.parallel.native", "build_stages"): "pipeline stages",
}


@contextmanager
def timed_phases(times: dict[str, float], progress: Progress | None = None) -> Iterator[None]:
    """Accumulate the wall time of each engine set-up function of PHASES into `times` (seconds),
    announcing the slow ones (materialize) through `progress`. Originals are restored on exit."""
    saved = []
    for (mod_name, attr), phase in PHASES.items():
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, attr)
        saved.append((mod, attr, fn))
        setattr(mod, attr, _timed(fn, phase, times, progress))
    try:
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


def _timed(fn: Callable, phase: str, times: dict[str, float], progress: Progress | None) -> Callable:
    def wrapper(*args, **kwargs):
        if progress is not None and phase == "materialize + init":
            progress(f"{phase} ...")
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[phase] = times.get(phase, 0.0) + time.perf_counter() - t0

    return wrapper


@dataclass
class CollectiveStat:
    count: int = 0
    bytes: float = 0.0
    """Bytes this rank sends (ring model, see the module docstring)."""
    largest: int = 0
    """Largest single buffer (the output of an all-gather, the input otherwise), in bytes."""


# op name -> (factor on the counted bytes as a function of group size n, which tensors count)
_FACTORS: dict[str, tuple[Callable[[int], float], str]] = {
    "allreduce_": (lambda n: 2 * (n - 1) / n, "in"),
    "all_reduce": (lambda n: 2 * (n - 1) / n, "in"),
    "all_reduce_coalesced": (lambda n: 2 * (n - 1) / n, "in"),
    "_allgather_base_": (lambda n: n - 1, "second"),
    "allgather_": (lambda n: n - 1, "second"),
    "allgather_into_tensor_coalesced_": (lambda n: n - 1, "second"),
    "all_gather_into_tensor": (lambda n: n - 1, "in"),
    "all_gather_into_tensor_coalesced": (lambda n: n - 1, "in"),
    "_reduce_scatter_base_": (lambda n: (n - 1) / n, "second"),
    "reduce_scatter_": (lambda n: (n - 1) / n, "second"),
    "reduce_scatter_tensor_coalesced_": (lambda n: (n - 1) / n, "second"),
    "reduce_scatter_tensor": (lambda n: (n - 1) / n, "in"),
    "reduce_scatter_tensor_coalesced": (lambda n: (n - 1) / n, "in"),
    "all_to_all_single": (lambda n: (n - 1) / n, "in"),
    "alltoall_base_": (lambda n: (n - 1) / n, "second"),
    "broadcast_": (lambda n: (n - 1) / n, "in"),
    "broadcast": (lambda n: (n - 1) / n, "in"),
    "send": (lambda n: 1.0, "in"),
    "recv_": (lambda n: 0.0, "in"),
    "recv_any_source_": (lambda n: 0.0, "in"),
    "barrier": (lambda n: 0.0, "in"),
}
_IGNORED = {"wait_tensor", "_wrap_tensor_autograd", "monitored_barrier_"}
_GATHERS = {op for op, (f, _) in _FACTORS.items() if f(4) == 3}  # output = n x the counted input


class StepRecorder(PeakTensorMemory):
    """Peak live tensor bytes (a DTensor's local storage, not its global size) plus the collectives,
    by process-group kind (`group_kinds`: group name -> "tp", "dp_shard", ...) and op."""

    def __init__(self, group_kinds: dict[str, str]) -> None:
        super().__init__()
        self.group_kinds = group_kinds
        self.collectives: dict[str, dict[str, CollectiveStat]] = defaultdict(
            lambda: defaultdict(CollectiveStat)
        )
        self.unknown: set[str] = set()
        self.resident: set[int] = set()

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Storages that exist before the step (parameters, optimizer state): in-place ops return
        them, which must not count as new allocations (AdamW's updates would add its whole state)."""
        for t in tensors:
            local = t.to_local() if isinstance(t, DTensor) else t
            self.resident.add(local.untyped_storage()._cdata)

    def track(self, t: torch.Tensor) -> None:
        if t.untyped_storage()._cdata not in self.resident:
            super().track(t)

    def __enter__(self) -> "StepRecorder":
        """Also follow `UntypedStorage.resize_`: FSDP2 frees and re-allocates unsharded parameters by
        resizing their storages (to 0 and back), which a weak reference on the storage never sees;
        without this the dry run counted every block's unsharded parameters as alive at once."""
        self._resize = torch.UntypedStorage.resize_
        recorder = self

        def resize_(st: torch.UntypedStorage, size: int) -> torch.UntypedStorage:
            out = recorder._resize(st, size)
            recorder._resized(st)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*exc)

    def _resized(self, st: torch.UntypedStorage) -> None:
        key = st._cdata
        if key in self.resident or st.device.type == "meta":
            return
        if key not in self.live:
            weakref.finalize(st, self._free, key)
        self.current += st.nbytes() - self.live.get(key, 0)
        self.live[key] = st.nbytes()
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs its local ops (and collectives) back through us
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional"):
            self.record(func._opname, args, kwargs or {})
        return super().__torch_dispatch__(func, types, args, kwargs)

    def record(self, op: str, args: tuple, kwargs: dict) -> None:
        """Count one collective under its group's kind, with the bytes this rank sends."""
        if op in _IGNORED:
            return
        group = _group_of(args, kwargs)
        kind = self.group_kinds.get(group.group_name, "other") if group is not None else "other"
        n = group.size() if group is not None else 1
        if op not in _FACTORS:
            self.unknown.add(op)
            return
        factor, which = _FACTORS[op]
        tensors = [a for a in args if isinstance(a, torch.Tensor | list)]
        counted = tensors[1] if which == "second" and len(tensors) > 1 else tensors[0] if tensors else []
        size = sum(t.numel() * t.element_size() for t in tree_leaves(counted) if isinstance(t, torch.Tensor))
        stat = self.collectives[kind][op]
        stat.count += 1
        stat.bytes += factor(n) * size if n > 1 else 0.0
        stat.largest = max(stat.largest, size * n if op in _GATHERS else size)


def _group_of(args: tuple, kwargs: dict) -> dist.ProcessGroup | None:
    """The process group of a c10d op (a boxed ProcessGroup) or a functional one (its name)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a)
            except (RuntimeError, TypeError):
                continue
    for a in reversed(args):
        if isinstance(a, str):
            try:
                return _resolve_process_group(a)
            except (RuntimeError, ValueError, KeyError):
                continue
    return None


def ddp_counting_hook(recorder: StepRecorder, kind: str, size: int) -> Callable:
    """A DDP comm hook that records each gradient bucket's all-reduce and completes at once with the
    bucket unchanged: the fake group's own future carries no value, which DDP's reducer rejects."""

    def hook(_state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        stat = recorder.collectives[kind]["allreduce_ (ddp bucket)"]
        stat.count += 1
        stat.bytes += 2 * (size - 1) / size * buf.numel() * buf.element_size()
        stat.largest = max(stat.largest, buf.numel() * buf.element_size())
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(buf)
        return fut

    return hook
