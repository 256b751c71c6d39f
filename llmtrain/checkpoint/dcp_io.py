"""Safe inspection and offline reading/writing of torch.distributed.checkpoint (DCP) folders.

DCP itself unpickles two things without restriction: the `.metadata` file and every non-tensor item
(optimizer hyper-parameters) with `torch.load(weights_only=False)`. `verify_dcp` first reads both
through restricted loaders (an allow-list unpickler for the metadata classes, `weights_only=True` for
the items) and checks every referenced byte range exists, so the engine's DCP load only ever sees bytes
already proven to hold plain data, and a truncated shard is reported by file name.
"""

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from llmtrain.checkpoint.folder import CheckpointError

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "strided", "contiguous_format", "preserve_format"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not dtype and name not in _ALLOWED.get(module, ()):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return super().find_class(module, name)


def read_metadata(folder: Path) -> Metadata:
    """The DCP metadata of `folder`, unpickled with an allow-list (no arbitrary objects)."""
    path = Path(folder) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a torch.distributed.checkpoint folder)")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or foreign DCP metadata ({type(e).__name__}: {e})") from e
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not DCP Metadata")
    return md


def verify_dcp(folder: Path, items: bool = True) -> Metadata:
    """Check byte ranges of every item and (`items`) that non-tensor items load with
    weights_only=True. items=False: the caller loads through checkpoint/inplace.py, which decodes
    those items safely itself (no second read of each)."""
    folder = Path(folder)
    md = read_metadata(folder)
    sizes: dict[str, int] = {}
    for index, info in (md.storage_data or {}).items():
        f = folder / info.relative_path
        if info.relative_path not in sizes:
            if not f.is_file():
                raise CheckpointError(f"{f}: missing shard referenced by {folder / '.metadata'}")
            sizes[info.relative_path] = f.stat().st_size
        if info.offset + info.length > sizes[info.relative_path]:
            raise CheckpointError(
                f"{f}: {sizes[info.relative_path]} bytes, but item {index.fqn} needs "
                f"{info.offset + info.length} (truncated shard)"
            )
        if items and isinstance(md.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            if info.transform_descriptors:
                raise CheckpointError(
                    f"{f}: item {index.fqn} uses storage transforms this loader does not verify"
                )
            with open(f, "rb") as fh:
                fh.seek(info.offset)
                raw = fh.read(info.length)
            try:
                torch.load(io.BytesIO(raw), weights_only=True)
            except Exception as e:
                raise CheckpointError(
                    f"{f}: item {index.fqn} is not plain data ({type(e).__name__}: {e})"
                ) from e
    return md


def tensor_shapes(folder: Path, prefix: str = "model.") -> dict[str, tuple[torch.Size, torch.dtype]]:
    """{name without prefix: (global shape, dtype)} of the tensors stored under `prefix`."""
    md = read_metadata(folder)
    return {
        k[len(prefix) :]: (v.size, v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
    }


def read_tensors(
    folder: Path, names: list[str], prefix: str = "model.", verify: bool = True
) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors `names` from a DCP folder in this process, no process group needed
    (verify=False only when the caller already ran `verify_dcp` on this folder)."""
    if verify:
        verify_dcp(folder)
    shapes = tensor_shapes(folder, prefix)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise CheckpointError(f"{folder}: no tensors {missing[:5]} under '{prefix}' (foreign layout?)")
    out = {n: torch.empty(shapes[n][0], dtype=shapes[n][1]) for n in names}
    nested = {prefix.rstrip("."): out} if prefix else out
    with single_process_dcp():
        dcp.load(nested, checkpoint_id=str(folder), no_dist=True)
    return out


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor], key: str = "model") -> None:
    """Write full tensors as a single-process DCP checkpoint ({key: tensors}, loadable under any layout)."""
    with single_process_dcp():
        dcp.save({key: tensors}, checkpoint_id=str(folder), no_dist=True)


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """Around DCP calls of one process without a process group (tools, 1-process runs): torch 2.13's
    dcp.save/load warn "torch.distributed is disabled, unavailable or uninitialized" on every call made
    that way, even with no_dist=True passed on purpose. Only that message is silenced, and only while no
    process group exists: a multi-rank load that somehow ran without one still warns. Not thread-safe
    (catch_warnings is not): background saves do not use it."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings(
                "ignore",
                message="torch.distributed is disabled, unavailable or uninitialized",
                category=UserWarning,
            )
        yield
