"""Object storage schema: how `s3://` data sources and checkpoint mirrors are reached.

Credentials are deliberately not part of the config: they come from the AWS chain (environment,
`~/.aws/credentials` / `~/.aws/config`, instance or pod roles), so they never reach the resolved config,
the logs, MLflow or a checkpoint.
"""

from dataclasses import dataclass


@dataclass(kw_only=True)
class StorageConfig:
    """Connection and read settings shared by every `s3://` path of the run (data and checkpoints)."""

    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, a local moto server), e.g. `http://10.0.0.5:9000`; None = the
    AWS default (or `AWS_ENDPOINT_URL` from the environment). Must not carry credentials (`user:pass@`)."""
    region: str | None = None
    """Region name passed to the S3 client; None = from the AWS config chain."""
    block_kb: int = 256
    """Unit of one ranged GET when reading shards from object storage (KiB); a sample is served from the
    blocks that cover it, never by downloading the whole shard."""
    cache_mb: int = 64
    """Blocks kept per dataset (least recently used dropped first)."""
    read_ahead: int = 4
    """Blocks fetched ahead: after a miss the next N blocks of the record batch are fetched in the
    background, and the missing blocks of one step are fetched concurrently. 0 = on demand, one by one."""
    upload_retries: int = 3
    """Attempts per checkpoint upload to a mirror (checkpoint.mirror) before that save is given up."""
    retry_backoff_s: float = 2.0
    """Wait before the first retry; doubled on each further one."""


def validate_storage(storage: StorageConfig, mirror: str | None) -> None:
    """Ranges of the storage keys; an endpoint or mirror URI that embeds credentials is refused (they
    would be recorded in the resolved config, MLflow and every checkpoint)."""
    from urllib.parse import urlsplit

    from llmtrain.config.errors import check

    if storage.endpoint_url is not None:
        url = urlsplit(storage.endpoint_url)
        check(
            url.scheme in ("http", "https") and bool(url.hostname),
            "storage.endpoint_url",
            f"{storage.endpoint_url!r} is not an http(s)://host[:port] URL",
        )
    for key, value in (("storage.endpoint_url", storage.endpoint_url), ("checkpoint.mirror", mirror)):
        check(
            value is None or "@" not in (urlsplit(value).netloc or ""),
            key,
            "must not embed credentials (user:secret@); they come from the AWS environment/config chain",
        )
    if mirror is not None:
        check("://" in mirror, "checkpoint.mirror", f"{mirror!r} is not a URI (s3://bucket/prefix, gs://...)")
    check(storage.block_kb >= 4, "storage.block_kb", "must be >= 4 (KiB per ranged read)")
    check(storage.cache_mb >= 1, "storage.cache_mb", "must be >= 1")
    check(storage.read_ahead >= 0, "storage.read_ahead", "must be >= 0 (0 = no read-ahead)")
    check(storage.upload_retries >= 1, "storage.upload_retries", "must be >= 1 (attempts per upload)")
    check(storage.retry_backoff_s >= 0, "storage.retry_backoff_s", "must be >= 0")
