"""Training over s3:// data sources: two mixed sources read from a real S3 API give the loss trace of the
same shards on local disk bit for bit, and a resume in the middle of the run (the loader position and
the shuffle of the second epoch) continues it exactly."""

from pathlib import Path

import pytest

from llmtrain.checkpoint.folder import step_dir
from llmtrain.data.prepare import prepare_dataset
from llmtrain.distributed.env import DistEnv
from llmtrain.train.trainer import Trainer
from tests.storage.conftest import upload_folder

ENV = DistEnv(0, 0, 1, 1)
SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
    "data.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.log_every=4",
    "trainer.val_every=0", "trainer.max_steps=12", "optim.warmup_steps=2", "data.prefetch=2",
    "checkpoint.enabled=true", "checkpoint.every_steps=6", "trainer.num_threads=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def two_sources(s3, tmp_path_factory) -> tuple[list[Path], list[str]]:
    """Two small corpora (the smaller one runs through more than one epoch in 12 steps), local and on S3."""
    root = tmp_path_factory.mktemp("corpora")
    bucket, local, remote = s3.bucket(), [], []
    for name, docs in (("a", 30), ("b", 300)):
        raw = root / f"{name}.jsonl"
        raw.write_text("".join(f'{{"text": "{name} {i}: {"ab" * (i % 11)}"}}\n' for i in range(docs)))
        prepare_dataset(raw, root / name, "byte", shard_tokens=1500)
        local.append(root / name)
        remote.append(upload_folder(s3, root / name, bucket, name))
    return local, remote


def sources(paths) -> str:
    return f"data.sources=[{{path: {paths[0]}, weight: 0.6}}, {{path: {paths[1]}, weight: 0.4}}]"


def losses(result: dict) -> list[float]:
    return [h["loss"] for h in result["history"]]


def test_s3_run_equals_local_run_and_resumes_exactly(make_config, s3, two_sources) -> None:
    local, remote = two_sources
    s3_cfg = [f"storage.endpoint_url={s3.url}", "storage.block_kb=4"]
    on_disk = Trainer(make_config(*SMALL, sources(local), "run.name=disk"), ENV).train()
    on_s3 = Trainer(make_config(*SMALL, *s3_cfg, sources(remote), "run.name=s3"), ENV).train()
    assert len(losses(on_disk)) == 12 and losses(on_s3) == losses(on_disk)  # bitwise
    step6 = step_dir(Path(on_s3["run_dir"]) / "checkpoints", 6)
    resumed = Trainer(
        make_config(*SMALL, *s3_cfg, sources(remote), "run.name=s3-resumed", f"checkpoint.resume={step6}"),
        ENV,
    ).train()
    assert losses(resumed) == losses(on_s3)[6:]
