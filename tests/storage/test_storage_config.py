"""storage.* keys: credentials never fit in the config, and each range names its key."""

import re

import pytest

from llmtrain.config.errors import ConfigError
from llmtrain.config.storage import StorageConfig, validate_storage
from llmtrain.testing import compose_config


@pytest.mark.parametrize(
    ("storage", "mirror", "message"),
    [
        ({"endpoint_url": "http://AKIA:secret@127.0.0.1:9000"}, None, "storage.endpoint_url: must not embed"),
        ({}, "s3://AKIA:secret@bucket/ckpt", "checkpoint.mirror: must not embed"),
        ({"endpoint_url": "127.0.0.1:9000"}, None, "storage.endpoint_url: '127.0.0.1:9000' is not an http"),
        ({}, "/local/folder", "checkpoint.mirror: '/local/folder' is not a URI"),
        ({"block_kb": 1}, None, "storage.block_kb: must be >= 4"),
        ({"read_ahead": -1}, None, "storage.read_ahead: must be >= 0"),
        ({"upload_retries": 0}, None, "storage.upload_retries: must be >= 1"),
    ],
)
def test_bad_storage_settings_name_the_key(storage: dict, mirror: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_storage(StorageConfig(**storage), mirror)


def test_endpoint_and_mirror_compose_and_are_validated() -> None:
    cfg = compose_config(["storage.endpoint_url=http://127.0.0.1:9000", "checkpoint.mirror=s3://b/ckpt"])
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000" and cfg.checkpoint.mirror == "s3://b/ckpt"
    with pytest.raises(ConfigError, match=re.escape("storage.endpoint_url: must not embed credentials")):
        compose_config(["storage.endpoint_url=http://AKIA:secret@127.0.0.1:9000"])
