"""Config -> params: secrets never leave the process, URLs lose their passwords, and which keys count
as secrets. (That a real server accepts the flattened params is in test_server.py.)"""

import pytest

from llmtrain.tracking.params import flatten, is_secret_key, redact_url


def test_secrets_are_dropped_and_urls_redacted():
    cfg = {
        "data": {
            "tokenizer": "byte",
            "shard_tokens": 1024,
            "hf_token": "hf_abc",
            "sources": [{"path": "/d"}],
        },
        "db": {"password": "pw", "uri": "postgresql://me:pw@db:5432/x"},
        "cloud": {"aws_secret_access_key": "k", "api_key": "k", "apikey": "k", "credentials": "c"},
        "tracking": {"uri": "http://127.0.0.1:5000", "tags": {"team": "nlp", "auth_token": "t"}},
    }
    flat = flatten(cfg)
    assert flat == {
        "data.tokenizer": "byte",
        "data.shard_tokens": "1024",
        "data.sources.0.path": "/d",
        "db.uri": "postgresql://me:<redacted>@db:5432/x",
        "tracking.uri": "http://127.0.0.1:5000",
        "tracking.tags.team": "nlp",
    }
    assert not is_secret_key("trainer.max_tokens") and is_secret_key("x.github_token")
    assert redact_url("http://host:5000/path") == "http://host:5000/path"


@pytest.mark.parametrize(
    "key", ["flush_every_s", "system_metrics_every_s", "max_buffer", "request_timeout_s"]
)
def test_tracking_cadences_must_be_positive(key):
    from llmtrain.config import ConfigError
    from llmtrain.testing import compose_config

    with pytest.raises(ConfigError, match=f"tracking.{key}: must be positive"):
        compose_config([f"tracking.{key}=0"])
