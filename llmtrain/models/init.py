"""Layout-independent parameter initialization whose cost scales with the local shard.

Every element of a parameter's *global* tensor gets its own random number from a counter-based
generator addressed by (seed, parameter name, global flat element index): a SplitMix64 hash of the
index, keyed by the name. A rank computes the numbers of the elements it owns only (plain tensor,
TP/FSDP2 DTensor shard or pipeline-stage parameter alike), so weights are bitwise identical under any
layout, and an 8b model at 256 ranks no longer draws 8 billion numbers on every rank.

The hash gives a uniform u in (0, 1) per element; a `Draw` maps it to the value (inverse-CDF
truncated normal, uniform, ones). The arithmetic is elementwise and exact (int64 with wrap-around,
float64 inverse CDF), so a value does not depend on which chunk or shard computed it.
"""

import math
import zlib
from collections.abc import Callable

import torch

Draw = Callable[[torch.Tensor], torch.Tensor]
"""u (float64 in (0, 1), one per element) -> the element values (any float dtype)."""

CHUNK = 1 << 15
"""Elements computed at a time on CPU: a few hundred KB of int64/float64 temporaries (cache-resident),
and at most torch's intra-op grain size (32768), so the elementwise ops stay on one thread: with more,
thread hand-offs on a loaded machine made the init 5x slower (measured, docs/dry_run.md)."""
DEVICE_CHUNK = 1 << 22
"""Elements at a time on an accelerator, where launches, not caches, are the cost."""

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores (same bits)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _xor_srl_(z: torch.Tensor, s: int, tmp: torch.Tensor) -> torch.Tensor:
    """z ^= z >>> s in place (`tmp` is scratch of z's shape): in-place ops run ~4x faster here than
    fresh tensors, whose page faults dominate."""
    torch.bitwise_right_shift(z, s, out=tmp)
    tmp.bitwise_and_((1 << (64 - s)) - 1)
    return z.bitwise_xor_(tmp)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer (Steele et al., 2014), in place: a bijection with good avalanche."""
    tmp = torch.empty_like(z)
    _xor_srl_(z, 30, tmp).mul_(_M1)
    _xor_srl_(z, 27, tmp).mul_(_M2)
    return _xor_srl_(z, 31, tmp)


def param_key(seed: int, name: str) -> int:
    """The stream key of one parameter; crc32 keeps it stable across Python runs."""
    z = (seed * 1_000_003 + zlib.crc32(name.encode())) & _MASK64
    return int(_mix(torch.tensor([_signed(z)], dtype=torch.int64))[0])


def uniforms(key: int, index: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1) for global flat element indices `index` (int64) of stream `key`."""
    z = _mix(index.mul(_GOLDEN).add_(key))
    return _srl(z, 11).to(torch.float64).add_(0.5).mul_(2.0**-53)


def trunc_normal(std: float, bound: float = 3.0) -> Draw:
    """N(0, std) truncated to +-bound std, by inverse CDF (torch's trunc_normal_ uses the same method)."""
    lo = 0.5 * math.erfc(bound / math.sqrt(2))
    span = 1.0 - 2.0 * lo
    return lambda u: torch.special.ndtri(lo + u * span) * std


def uniform(bound: float) -> Draw:
    """U(-bound, bound)."""
    return lambda u: (2.0 * u - 1.0) * bound


def ones(u: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(u)


def fill_param(p: torch.Tensor, draw: Draw, seed: int = 0, name: str = "") -> None:
    """Fill p (plain tensor or DTensor) with its elements of the global tensor draw(u(name, index)).

    Only the local shard is computed, CHUNK elements at a time; meta tensors (dry runs that do not
    allocate the shard) are left alone."""
    local, offset = _local_view(p)
    if local.is_meta or local.numel() == 0:
        return
    key = param_key(seed, name)
    strides = _contiguous_strides(p.shape)
    rows = local.shape[0] if local.dim() else 1
    per_row = max(local.numel() // max(rows, 1), 1)
    step = max((CHUNK if local.device.type == "cpu" else DEVICE_CHUNK) // per_row, 1)
    flat = local.view(1) if local.dim() == 0 else local
    for start in range(0, rows, step):
        block = flat[start : start + step]
        index = _global_index(block.shape, (offset[0] + start, *offset[1:]), strides, local.device)
        block.copy_(draw(uniforms(key, index)).to(block.dtype))


def _local_view(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(this rank's storage of p, its offset in the global tensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()  # type: ignore[assignment]
    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return p.to_local(), tuple(offset) or (0,)
    return p, (0,) * max(p.dim(), 1)


def _contiguous_strides(shape: torch.Size) -> list[int]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return list(reversed(strides)) or [1]


def _global_index(
    shape: torch.Size, offset: tuple[int, ...], strides: list[int], device: torch.device
) -> torch.Tensor:
    """Global flat indices (int64, shaped like the block) of a block at `offset` of the global tensor."""
    shape = shape or torch.Size([1])
    index = torch.zeros(shape, dtype=torch.int64, device=device)
    for d, (size, off, stride) in enumerate(zip(shape, offset, strides)):
        view = [1] * len(shape)
        view[d] = size
        index += (torch.arange(size, dtype=torch.int64, device=device) + off).mul_(stride).view(view)
    return index
