"""Layout-independent parameter initialization.

A parameter may be a plain tensor, a DTensor (TP or FSDP2 shard) or a pipeline-stage parameter; in
every case the *global* tensor is drawn from a generator keyed by the parameter's name, and the rank
copies in only the slice it owns. Names are stable across layouts (see `Transformer`), so the weights
are identical under any parallelism.
"""

import zlib
from collections.abc import Callable

import torch

Draw = Callable[[torch.Size, torch.Generator], torch.Tensor]


def param_generator(seed: int, name: str) -> torch.Generator:
    """CPU generator for one parameter; crc32 keeps the seed stable across Python runs."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def fill_param(p: torch.Tensor, draw: Draw, seed: int = 0, name: str = "") -> None:
    """Fill p (plain or DTensor) with its slice of draw(global_shape, generator)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()  # type: ignore[assignment]
    g = param_generator(seed, name)
    if isinstance(p, DTensor):
        full = draw(p.shape, g)
        local = _local_slice(full, p)
        p.to_local().copy_(local.to(p.to_local().device, p.dtype))
    else:
        p.copy_(draw(p.shape, g).to(p.device, p.dtype))


def _local_slice(full: torch.Tensor, p) -> torch.Tensor:
    """The part of a global tensor that this rank's DTensor shard holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[index]
