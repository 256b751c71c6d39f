"""Build the train/validation loaders from the typed data config."""

from llmtrain.config.data import DataConfig
from llmtrain.data.dataset import TokenDataset
from llmtrain.data.errors import DataError
from llmtrain.data.format import INDEX_NAME, DatasetIndex
from llmtrain.data.fs import resolve
from llmtrain.data.loader import DataLoader
from llmtrain.data.prepare import prepare_dataset
from llmtrain.data.tokenizer import load_tokenizer


def ensure_prepared(cfg: DataConfig) -> None:
    """Tokenize sources that name `raw` text and have no readable index yet (run once, before ranks
    start). An existing dataset is used as it is, whatever settings made it (check_tokenizer still
    compares its tokenizer with data.tokenizer); tools/prepare_data.py is the way to rebuild one."""
    for src in cfg.sources:
        if not src.raw:
            continue
        try:
            DatasetIndex.load(src.path)
        except DataError as e:  # missing, unreadable or an older format: (re)build it
            if "://" in src.path:  # a dataset in object storage is made with tools/prepare_data.py --out
                raise DataError(
                    f"data.sources path {src.path}: `raw` needs a local path to write shards to ({e})"
                ) from e
            prepare_dataset(src.raw, src.path, cfg.tokenizer, val_fraction=0.05)


def check_tokenizer(cfg: DataConfig, vocab_size: int) -> None:
    """The shards, the configured tokenizer and the model's vocabulary must agree."""
    expected = load_tokenizer(cfg.tokenizer).identity
    for src in cfg.sources:
        loc = resolve(src.path)
        index = DatasetIndex.load(loc)
        if index.tokenizer != expected:
            raise DataError(
                f"{loc.child(INDEX_NAME).uri}: shards were tokenized with {index.tokenizer!r} but "
                f"data.tokenizer={cfg.tokenizer!r} is {expected!r}"
            )
        if index.vocab_size > vocab_size:
            raise DataError(
                f"{loc.child(INDEX_NAME).uri}: tokenizer vocabulary {index.vocab_size} exceeds "
                f"model.vocab_size={vocab_size}"
            )


def _datasets(cfg: DataConfig, split: str | None) -> list[TokenDataset]:
    out = []
    for src in cfg.sources:
        loc = resolve(src.path)
        out.append(
            TokenDataset(
                loc if split is None else loc.child(split),
                cfg.seq_len,
                packing=cfg.packing,
                verify_checksums=cfg.verify_checksums,
                release_every=cfg.mmap_release_every,
            )
        )
    tokenizers = {d.index.tokenizer for d in out}
    if len(tokenizers) > 1:
        raise DataError(f"data.sources were tokenized differently ({', '.join(sorted(tokenizers))})")
    return out


def build_train_loader(
    cfg: DataConfig, *, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int
) -> DataLoader:
    """Loader over all training sources, mixed by weight, for one data-parallel rank (tp/pp ranks of
    one replica pass the same dp_rank and so get the same batches)."""
    return DataLoader(
        _datasets(cfg, None),
        weights=[s.weight for s in cfg.sources],
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        document_mask=cfg.document_mask,
        prefetch=cfg.prefetch,
    )


def build_val_loader(
    cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_size: int
) -> DataLoader | None:
    """Unshuffled loader over the validation split of the first source, or None when there is none."""
    loc = resolve(cfg.sources[0].path).child(cfg.val_split)
    if not loc.child(INDEX_NAME).exists():
        return None
    ds = TokenDataset(
        loc,
        cfg.seq_len,
        packing=cfg.packing,
        verify_checksums=cfg.verify_checksums,
        release_every=cfg.mmap_release_every,
    )
    return DataLoader(
        ds,
        micro_batch_size=micro_batch_size,
        grad_accum=1,
        dp_rank=dp_rank,
        dp_size=dp_size,
        shuffle=False,
        document_mask=cfg.document_mask,
    )


__all__ = ["build_train_loader", "build_val_loader", "check_tokenizer", "ensure_prepared"]
