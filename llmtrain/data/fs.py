"""Where a dataset lives: a local folder, a pyarrow filesystem URI (`file://`, `gs://`, `hdfs://`),
`s3://` (s3fs with the process's storage settings, data/objstore.py) or any fsspec URI (`memory://`,
...), all seen through one `pyarrow.fs.FileSystem`.

Local files (also behind `file://` or a `SubTreeFileSystem` over the local disk) are opened
memory-mapped, so the reader views token buffers in the page cache without copying. Other
filesystems are read with ranged reads of the bytes a sample needs (data/remote.py); `ranged` is the
fsspec filesystem behind a Location when there is one (it batches ranged GETs concurrently).
"""

import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from llmtrain.data import objstore
from llmtrain.data.errors import DataError


@dataclass(frozen=True)
class Location:
    """A folder on a filesystem; `mmap` is true when files open as zero-copy memory maps."""

    fs: pafs.FileSystem
    path: str
    uri: str
    ranged: Any = None

    @property
    def mmap(self) -> bool:
        return _is_local(self.fs)

    @property
    def local_path(self) -> str | None:
        """The operating-system path when the file is on the local disk (then it is memory-mapped)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return self.path
        if isinstance(self.fs, pafs.SubTreeFileSystem) and isinstance(self.fs.base_fs, pafs.LocalFileSystem):
            return str(PurePosixPath(self.fs.base_path) / self.path.lstrip("/"))
        return None

    def child(self, name: str) -> "Location":
        """The file or folder `name` inside this folder."""
        path, uri = str(PurePosixPath(self.path) / name), f"{self.uri.rstrip('/')}/{name}"
        return Location(self.fs, path, uri, self.ranged)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size

    def read_text(self) -> str:
        with self.fs.open_input_stream(self.path) as f:
            return f.read().decode("utf-8")

    def open(self) -> pa.NativeFile:
        """Random-access handle (a memory map for local files)."""
        return self.fs.open_input_file(self.path)


def _is_local(fs: pafs.FileSystem) -> bool:
    if isinstance(fs, pafs.LocalFileSystem):
        return True
    return isinstance(fs, pafs.SubTreeFileSystem) and isinstance(fs.base_fs, pafs.LocalFileSystem)


def _with_mmap(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The same filesystem, but opening local files as memory maps (zero-copy reads)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return pafs.LocalFileSystem(use_mmap=True)
    if isinstance(fs, pafs.SubTreeFileSystem) and isinstance(fs.base_fs, pafs.LocalFileSystem):
        return pafs.SubTreeFileSystem(fs.base_path, pafs.LocalFileSystem(use_mmap=True))
    return fs


def as_pyarrow_fs(filesystem: Any) -> pafs.FileSystem:
    """Accept a pyarrow FileSystem or an fsspec AbstractFileSystem."""
    if isinstance(filesystem, pafs.FileSystem):
        return _with_mmap(filesystem)
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))


def resolve(path: str, filesystem: Any = None) -> Location:
    """Map a dataset path (plain path or URI, optionally relative to `filesystem`) to a Location."""
    path = str(path)
    if filesystem is not None:
        ranged = None if isinstance(filesystem, pafs.FileSystem) else filesystem
        return Location(as_pyarrow_fs(filesystem), path, path, ranged)
    if "://" not in path:
        return Location(pafs.LocalFileSystem(use_mmap=True), os.path.abspath(path), path)
    if objstore.is_s3(path):
        ffs, inner = objstore.filesystem_for(path)
        return Location(as_pyarrow_fs(ffs), inner, path, ffs)
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
        return Location(_with_mmap(fs), inner, path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        try:
            import fsspec
        except ImportError:
            raise DataError(
                f"{path}: pyarrow does not know this URI scheme and fsspec is not installed"
            ) from e
        try:
            ffs, inner = fsspec.core.url_to_fs(path)
        except (ValueError, ImportError) as e2:
            raise DataError(f"{path}: no pyarrow or fsspec filesystem for this URI ({e2})") from e2
        return Location(as_pyarrow_fs(ffs), inner, path, ffs)
