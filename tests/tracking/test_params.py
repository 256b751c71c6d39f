"""Config -> params: secrets never leave the process, URLs lose their passwords, and which keys count
as secrets. (That a real server accepts the flattened params is in test_server.py.)"""

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
