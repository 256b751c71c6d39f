"""Data pipeline: Arrow shard format, tokenizers, memory-mapped reader, deterministic loader."""

from llmtrain.data.build import build_train_loader, build_val_loader, ensure_prepared
from llmtrain.data.format import DataError, DatasetIndex
from llmtrain.data.loader import IGNORE_INDEX, Batch, DataLoader

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "DataError",
    "DataLoader",
    "DatasetIndex",
    "build_train_loader",
    "build_val_loader",
    "ensure_prepared",
]
