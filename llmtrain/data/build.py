"""Build the train/validation loaders from the typed data config."""

from pathlib import Path

from llmtrain.config.data import DataConfig
from llmtrain.data.dataset import TokenDataset
from llmtrain.data.format import INDEX_NAME, DataError, DatasetIndex
from llmtrain.data.loader import DataLoader
from llmtrain.data.prepare import prepare_dataset
from llmtrain.data.tokenizer import load_tokenizer


def ensure_prepared(cfg: DataConfig) -> None:
    """Tokenize sources that name `raw` text and have no index yet (run once, before ranks start)."""
    for src in cfg.sources:
        if src.raw and not (Path(src.path) / INDEX_NAME).is_file():
            prepare_dataset(src.raw, src.path, cfg.tokenizer, val_fraction=0.05)


def check_tokenizer(cfg: DataConfig, vocab_size: int) -> None:
    """The shards, the configured tokenizer and the model's vocabulary must agree."""
    expected = load_tokenizer(cfg.tokenizer).identity
    for src in cfg.sources:
        index = DatasetIndex.load(src.path)
        if index.tokenizer != expected:
            raise DataError(
                f"{Path(src.path) / INDEX_NAME}: shards were tokenized with {index.tokenizer!r} but "
                f"data.tokenizer={cfg.tokenizer!r} is {expected!r}"
            )
        if index.vocab_size > vocab_size:
            raise DataError(
                f"{Path(src.path) / INDEX_NAME}: tokenizer vocabulary {index.vocab_size} exceeds "
                f"model.vocab_size={vocab_size}"
            )


def build_train_loader(
    cfg: DataConfig, *, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int
) -> DataLoader:
    """Loader over the (first) training source for one data-parallel rank."""
    ds = TokenDataset(cfg.sources[0].path, cfg.seq_len)
    return DataLoader(
        ds,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        document_mask=cfg.document_mask,
    )


def build_val_loader(
    cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_size: int
) -> DataLoader | None:
    """Unshuffled loader over the validation split of the first source, or None when there is none."""
    folder = Path(cfg.sources[0].path) / cfg.val_split
    if not (folder / INDEX_NAME).is_file():
        return None
    ds = TokenDataset(folder, cfg.seq_len)
    return DataLoader(
        ds,
        micro_batch_size=micro_batch_size,
        grad_accum=1,
        dp_rank=dp_rank,
        dp_size=dp_size,
        shuffle=False,
        document_mask=cfg.document_mask,
    )
