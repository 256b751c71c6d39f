"""storage.* keys: credentials never fit in the config, and each range names its key."""

import pytest

from llmtrain.config.errors import ConfigError
from llmtrain.testing import compose_config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("storage.endpoint_url=http://AKIA:secret@127.0.0.1:9000", "storage.endpoint_url: must not embed"),
        ("checkpoint.mirror=s3://AKIA:secret@bucket/ckpt", "checkpoint.mirror: must not embed"),
        ("storage.endpoint_url=127.0.0.1:9000", "storage.endpoint_url: '127.0.0.1:9000' is not an http"),
        ("checkpoint.mirror=/local/folder", "checkpoint.mirror: '/local/folder' is not a URI"),
        ("storage.block_kb=1", "storage.block_kb: must be >= 4"),
        ("storage.read_ahead=-1", "storage.read_ahead: must be >= 0"),
        ("storage.upload_retries=0", "storage.upload_retries: must be >= 1"),
    ],
)
def test_bad_storage_settings_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config(["tracking=none", override])


def test_endpoint_and_mirror_compose() -> None:
    cfg = compose_config(["storage.endpoint_url=http://127.0.0.1:9000", "checkpoint.mirror=s3://b/ckpt"])
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000" and cfg.checkpoint.mirror == "s3://b/ckpt"
