"""The config path: data.* keys through Hydra composition into loaders (what the trainer calls)."""

from pathlib import Path

import pytest
import torch

from llmtrain.config.validate import ConfigError
from llmtrain.data import IGNORE_INDEX, build_train_loader, build_val_loader
from tests.data.conftest import random_lengths


def test_config_builds_mixed_packed_masked_loaders(make_config, shakespeare_dir: Path, synth) -> None:
    other = synth("other", random_lengths(300, 5, 40), tokenizer="byte-v1")
    cfg = make_config(
        f"data.sources=[{{path: {shakespeare_dir}, weight: 3}}, {{path: {other}, weight: 1}}]",
        "data.seq_len=32",
        "data.packing=whole_documents",
        "data.document_mask=true",
        "data.prefetch=1",
    )
    train = build_train_loader(cfg.data, micro_batch_size=4, grad_accum=2, dp_rank=1, dp_size=2)
    assert len(train.datasets) == 2 and train.schedule.weights == [0.75, 0.25]
    batches = train.next_step()
    assert len(batches) == 2 and batches[0].inputs.shape == (4, 32)
    assert batches[0].attn_mask.shape == (4, 1, 32, 32) and batches[0].positions.shape == (4, 32)
    assert train.state_dict()["consumed"] == 16
    train.close()
    val = build_val_loader(cfg.data, micro_batch_size=2, dp_rank=0, dp_size=1)
    assert val is not None and val.datasets[0].loc.path.endswith("val")
    first = val.next_step()[0]
    val.consumed = 0
    assert torch.equal(val.next_step()[0].inputs, first.inputs)
    assert (first.targets != IGNORE_INDEX).any()


def test_bad_packing_value_names_the_key(make_config) -> None:
    with pytest.raises(ConfigError, match=r"data\.packing='pack'.*concat, whole_documents"):
        make_config("data.packing=pack")


def test_ensure_prepared_builds_once_and_never_rebuilds_an_existing_dataset(tmp_path: Path) -> None:
    from llmtrain.config.data import DataConfig, DataSourceConfig
    from llmtrain.data import ensure_prepared
    from llmtrain.data.prepare import prepare_dataset

    raw = tmp_path / "a.txt"
    raw.write_text("some text " * 300)
    made = tmp_path / "made"
    prepare_dataset(raw, made, "byte", shard_tokens=500)  # other settings than ensure_prepared's
    stamps = sorted((p.name, p.stat().st_mtime_ns) for p in made.iterdir())
    cfg = DataConfig(sources=[DataSourceConfig(path=str(made), raw=str(raw)),
                              DataSourceConfig(path=str(tmp_path / "fresh"), raw=str(raw))])  # fmt: skip
    ensure_prepared(cfg)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in made.iterdir()) == stamps  # used as it is
    assert (tmp_path / "fresh" / "index.json").is_file()
    assert not (tmp_path / "fresh" / "val").exists()  # 5% of one document: no validation split at all
