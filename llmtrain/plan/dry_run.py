"""Dry runs: one process plays rank r of an N-rank job on torch's fake process group.

The fake backend (`torch.testing._internal.distributed.fake_pg`) accepts every collective and returns
at once without moving data, so meshes, DTensor placements, FSDP2 shards and pipeline splits are
built by the real engine code exactly as on rank r of the real job, and real forward, backward and
optimizer steps run on that rank's shard. Values after a collective are meaningless; shapes,
allocations, the collective schedule and its sizes are the real ones.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist


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
