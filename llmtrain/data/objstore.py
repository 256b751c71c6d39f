"""Object stores (S3 and S3-compatible servers) as fsspec filesystems, configured once per process.

`configure(cfg.storage)` is called by the trainer and the tools before any `s3://` path is opened;
`filesystem_for(uri)` then hands every caller (data readers, checkpoint mirror, prepare_data) one
`s3fs.S3FileSystem` built from those settings. Credentials are never passed here: botocore reads
them from its usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
AWS_PROFILE and ~/.aws/*, instance roles), so no secret reaches our config, logs or MLflow.
Other fsspec URIs (`gs://`, `memory://`, ...) go through `fsspec.core.url_to_fs` unchanged.
"""

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmtrain.config.storage import StorageConfig
from llmtrain.data.errors import DataError

S3_SCHEMES = ("s3://", "s3a://")
_settings = StorageConfig()
_cache: dict[tuple, Any] = {}
_lock = threading.Lock()


def configure(storage: StorageConfig) -> None:
    """Use these storage settings for every object-store path this process opens from now on."""
    global _settings
    with _lock:
        _settings = replace(storage)


def settings() -> StorageConfig:
    """The storage settings in effect (read-ahead and cache sizes for the shard readers)."""
    return _settings


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEMES)


def s3_filesystem() -> Any:
    """The process's S3 filesystem for the configured endpoint/region (one client, reused)."""
    s = _settings
    key = (s.endpoint_url, s.region)
    with _lock:
        fs = _cache.get(key)
        if fs is None:
            try:
                import s3fs
            except ImportError as e:
                raise DataError(
                    "s3:// paths need s3fs: pip install 'llmtrain[s3]' (or bash tools/setup.sh s3)"
                ) from e
            client = {"region_name": s.region} if s.region else {}
            # one botocore retry only: the checkpoint mirror owns the retry policy (storage.upload_retries)
            fs = s3fs.S3FileSystem(
                endpoint_url=s.endpoint_url,
                client_kwargs=client,
                config_kwargs={"retries": {"max_attempts": 2}, "connect_timeout": 5, "read_timeout": 60},
                use_listings_cache=False,
                skip_instance_cache=True,
            )
            _cache[key] = fs
    return fs


def filesystem_for(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for an object-store or other fsspec URI."""
    if is_s3(uri):
        return s3_filesystem(), str(uri).split("://", 1)[1]
    import fsspec

    return fsspec.core.url_to_fs(str(uri))


def put_tree(
    local: Path, uri: str, last: tuple[str, ...] = (), after_object: Callable[[str], None] | None = None
) -> list[str]:
    """Upload every file under `local` to `uri` (same relative keys), the files named in `last` after all
    others and in that order: a reader that looks for those (an index, a completion manifest) never sees
    them before the objects they describe. `after_object(relative path)` runs after each upload (tests
    cut the server there). Returns the relative paths in upload order."""
    fs, root = filesystem_for(uri)
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    order = [f for f in files if f not in last] + [f for f in last if f in files]
    for rel in order:
        fs.put_file(str(local / rel), f"{root.rstrip('/')}/{rel}")
        if after_object is not None:
            after_object(rel)
    return order
