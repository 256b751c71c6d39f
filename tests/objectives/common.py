"""Tiny-model configs, a synthetic instruction set and a pretrained checkpoint shared by the
objective, LoRA and evaluation tests."""

import json
from pathlib import Path

import pytest
import torch

from llmtrain.config import Config
from llmtrain.distributed.env import DistEnv
from llmtrain.testing import compose_config

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn_dim=64",
    "data.seq_len=32",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.num_threads=1",
    "trainer.log_every=100",
    "trainer.val_batches=1",
    "tracking=none",
    "checkpoint.every_steps=0",
]


def tiny_config(data: Path, root: Path, *overrides: str) -> Config:
    """The real conf/ tree with a tiny model on the session's Shakespeare shards."""
    return compose_config([*TINY, f"data.sources.0.path={data}", f"run.root={root}", *overrides])


def train(cfg: Config) -> dict:
    """One in-process training run on this (single) rank."""
    from llmtrain.train.trainer import Trainer

    torch.set_num_threads(1)
    return Trainer(cfg, DistEnv(0, 0, 1, 1)).train()


def losses(out: dict) -> list[float]:
    return [h["loss"] for h in out["history"]]


def addition_examples() -> list[dict[str, str]]:
    """25 byte-level instruction pairs: 'Q: add a b\\nA: ' -> str(a + b)."""
    return [{"prompt": f"Q: add {a} {b}\nA: ", "response": str(a + b)} for a in range(5) for b in range(5)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def pretrained_run(shakespeare_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A causal-LM run of 6 steps with its final checkpoint: the base / teacher of fine-tuning tests."""
    root = tmp_path_factory.mktemp("pretrain")
    train(tiny_config(shakespeare_dir, root, "run.name=base", "trainer.max_steps=6"))
    return root / "base"
