"""Data pipeline: Arrow shard format, tokenizers, memory-mapped reader, deterministic loader.

Names are imported lazily so that tools (prepare_data, verify) load without torch or the config
schema; `from llmtrain.data import DataLoader` works as usual.
"""

import importlib
from typing import Any

_EXPORTS = {
    "build_train_loader": "build",
    "build_val_loader": "build",
    "check_tokenizer": "build",
    "ensure_prepared": "build",
    "PACKING_MODES": "dataset",
    "TokenDataset": "dataset",
    "DataError": "errors",
    "DatasetIndex": "format",
    "IGNORE_INDEX": "loader",
    "Batch": "loader",
    "DataLoader": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmtrain.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llmtrain.data.{_EXPORTS[name]}"), name)
