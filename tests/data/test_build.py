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


PREPARE_FROM_CWD = """
import os
from llmtrain.data.build import ensure_prepared
from llmtrain.testing import compose_config
data = compose_config([]).data
ensure_prepared(data)
index = os.path.join(os.path.abspath(data.sources[0].path), "index.json")
print(index, os.stat(index).st_mtime_ns)
"""


def test_the_default_data_cache_is_the_same_from_any_working_directory(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("LLMTRAIN_DATA_CACHE", "LLMTRAIN_CACHE_DIR")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(root))
    env.pop("XDG_CACHE_HOME", None)
    seen = []
    for cwd in (tmp_path / "a", tmp_path / "b" / "deeper"):
        cwd.mkdir(parents=True)
        run = subprocess.run(
            [sys.executable, "-c", PREPARE_FROM_CWD],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        seen.append(run.stdout.split())
        assert not any(cwd.iterdir())  # nothing written into the working directory
    expected = tmp_path / "home" / ".cache" / "llmtrain" / "data" / "shakespeare-byte" / "index.json"
    assert seen[0] == seen[1] and seen[0][0] == str(expected)  # built once, found again from b


def test_the_data_cache_follows_the_user_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from llmtrain.paths import user_cache_dir
    from llmtrain.testing import compose_config

    monkeypatch.delenv("LLMTRAIN_DATA_CACHE", raising=False)
    for var, value in (("XDG_CACHE_HOME", tmp_path / "xdg"), ("LLMTRAIN_CACHE_DIR", tmp_path / "mine")):
        monkeypatch.setenv(var, str(value))
        path = compose_config([]).data.sources[0].path
        assert path == str(user_cache_dir() / "data" / "shakespeare-byte")
        assert path.startswith(str(value))
    monkeypatch.setenv("LLMTRAIN_DATA_CACHE", str(tmp_path / "d"))
    assert compose_config([]).data.sources[0].path == str(tmp_path / "d" / "shakespeare-byte")
