"""The trainer reads through this pipeline: a mixed, whole-document-packed, document-masked run
resumes from a checkpoint with the loss trace of the uninterrupted run."""

from pathlib import Path

from llmtrain.checkpoint.folder import step_dir
from llmtrain.data.prepare import prepare_dataset
from llmtrain.distributed.env import DistEnv
from llmtrain.train.trainer import Trainer

SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
    "data.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.log_every=4",
    "trainer.val_every=0", "trainer.max_steps=8", "optim.warmup_steps=2", "data.packing=whole_documents",
    "data.document_mask=true", "data.prefetch=2", "checkpoint.enabled=true", "checkpoint.every_steps=4",
]  # fmt: skip


def test_mixed_masked_run_resumes_exactly(make_config, shakespeare_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "short.jsonl"
    raw.write_text("".join(f'{{"text": "line {i}: {"ab" * (i % 13)}"}}\n' for i in range(400)))
    prepare_dataset(raw, tmp_path / "short", "byte")
    sources = (
        f"data.sources=[{{path: {shakespeare_dir}, weight: 1}}, {{path: {tmp_path / 'short'}, weight: 1}}]"
    )
    straight = Trainer(make_config(*SMALL, sources, "run.name=straight"), DistEnv(0, 0, 1, 1)).train()
    step4 = step_dir(Path(straight["run_dir"]) / "checkpoints", 4)
    assert step4.is_dir()
    resumed = Trainer(
        make_config(*SMALL, sources, "run.name=resumed", f"checkpoint.resume={step4}"), DistEnv(0, 0, 1, 1)
    ).train()
    want = [h["loss"] for h in straight["history"]][4:]
    got = [h["loss"] for h in resumed["history"]]
    assert len(want) == 4 and got == want
