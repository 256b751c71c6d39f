"""Config -> params: secrets never leave the process, values fit MLflow's limits, and a real store
accepts hundreds of params with long values."""

from mlflow.tracking import MlflowClient

from llmtrain.tracking.mlflow_logger import MLflowLogger
from llmtrain.tracking.params import MAX_PARAM_LEN, flatten, is_secret_key, redact_url


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


def test_many_params_and_long_values_fit_mlflow(tmp_path):
    params = flatten({"group": {f"p{i:03d}": i for i in range(350)}, "long": "x" * 10_000, "k" * 300: 1})
    assert len(params["long"]) == MAX_PARAM_LEN and max(map(len, params)) == 250
    logger = MLflowLogger(
        f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path, experiment="t", run_name="params", run_id=None,
        flush_every_s=0.05,
    )  # fmt: skip
    logger.log_params(params)
    logger.finish()
    got = MlflowClient(logger.uri).get_run(logger.run_id).data.params
    assert got == params and len(got) == 352
