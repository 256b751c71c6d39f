"""Per-user folders that do not depend on the working directory."""

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """llmtrain's cache folder: $LLMTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/llmtrain, else
    ~/.cache/llmtrain. The same precedence builds the default tokenized-data cache in
    conf/data/shakespeare.yaml (`<cache>/data`), so every run of a user finds the same files
    whatever folder it is started from."""
    if explicit := os.environ.get("LLMTRAIN_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmtrain"
