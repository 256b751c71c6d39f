"""The resolved config as MLflow params: flattened, within MLflow's limits, secrets never sent.

Limits (mlflow.utils.validation): key <= 250 chars, value <= 6000 chars, 100 params per batch
(the uploader batches). A run has no cap on the number of params, so nothing is dropped for count.
"""

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MAX_PARAM_LEN = 6000
MAX_KEY_LEN = 250
REDACTED = "<redacted>"

# A key is secret when its last component is, or ends in, one of these words ("hf_token",
# "db_password", "api_key", "aws_secret_access_key"); "tokenizer" or "shard_tokens" are not.
_SECRET_KEY = re.compile(
    r"(^|[_\-])(token|auth_token|password|passwd|pwd|secret|secret_key|secret_access_key|"
    r"api_?key|access_key|private_key|credentials?|auth)$",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """True for config keys that hold credentials (matched on the last dotted component)."""
    return bool(_SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def redact_url(value: str) -> str:
    """Drop the password from `scheme://user:password@host/...` values; other strings unchanged."""
    if "://" not in value or "@" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.password is None:
        return value
    host = parts.hostname or ""
    netloc = f"{parts.username}:{REDACTED}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _fit(value: str) -> str:
    return value if len(value) <= MAX_PARAM_LEN else value[: MAX_PARAM_LEN - 3] + "..."


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}: secrets dropped, URLs redacted, long values cut.

    Lists of dicts (e.g. data.sources) flatten with their index: "data.sources.0.path".
    """
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        elif is_secret_key(key):
            continue
        else:
            out[key[:MAX_KEY_LEN]] = _fit(redact_url(str(v)))
    return out
