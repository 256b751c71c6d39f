"""`parallel.backend` switches the engine with no other change: the real trainer (data loader, LR
schedule, checkpoint manager, auto-resume) drives DeepSpeed ZeRO-2 on 2 ranks through a save and an
auto-resume, and matches 6 straight steps of the native single-process trainer; its checkpoint then
converts to native weights (tools/to_native.py) and exports to Hugging Face like the native run's."""

import copy

import pytest

from llmtrain.distributed.env import DistEnv
from llmtrain.train.trainer import Trainer
from tests.distributed import run_distributed

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install 'llmtrain[deepspeed]'")

RUN = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=64",
    "data.seq_len=32",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    "trainer.log_every=100",
    "trainer.val_every=0",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "trainer.num_threads=1",
    "checkpoint.every_steps=3",
    "trainer.val_batches=1",
]


def _losses(out: dict) -> list[float]:
    return [h["loss"] for h in out["history"]]


def _ds_runs(rank: int, world: int, cfg) -> dict:
    env = DistEnv(rank, rank, world, world)
    first = copy.deepcopy(cfg)
    first.trainer.max_steps = 3
    a = Trainer(first, env).train()  # saves step 3 through DeepSpeed into our checkpoint layout
    b = Trainer(copy.deepcopy(cfg), env).train()  # same run name: auto-resumes from step 3 to 6
    return {"losses": _losses(a) + _losses(b), "first_step_b": b["history"][0]["step"]}


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_trainer_with_deepspeed_matches_native_and_resumes(make_config, tmp_path) -> None:
    native = make_config(*RUN, "trainer.max_steps=6", "run.name=native")
    ref = _losses(Trainer(native, DistEnv(0, 0, 1, 1)).train())
    ds = make_config(
        *RUN, "trainer.max_steps=6", "run.name=ds", "parallel=zero2", "parallel.backend=deepspeed"
    )
    r0, r1 = run_distributed(_ds_runs, world_size=2, args=(ds,), timeout=180)
    assert r0 == r1 and r0["first_step_b"] == 4
    # 3 steps + save + auto-resume + 3 steps on DeepSpeed == 6 straight native steps
    assert max(abs(a - b) / b for a, b in zip(r0["losses"], ref, strict=True)) < 1e-6
    # the DeepSpeed checkpoint as native weights, and as an HF folder, equal the native run's
    from pathlib import Path

    from safetensors.torch import load_file

    from llmtrain.checkpoint.convert import export_hf
    from llmtrain.checkpoint.dcp_io import read_tensors, tensor_shapes
    from llmtrain.checkpoint.formats import engine_of, to_native

    runs = Path(ds.run.root)
    ds_ckpt, native_ckpt = (
        runs / "ds" / "checkpoints" / "step_00000006",
        runs / "native" / "checkpoints" / "step_00000006",
    )
    assert engine_of(ds_ckpt) == "deepspeed" and engine_of(native_ckpt) == "native"
    converted = to_native(runs / "ds", tmp_path / "as_native") / "model_optim"
    got = read_tensors(converted, sorted(tensor_shapes(converted)))
    want = read_tensors(native_ckpt / "model_optim", sorted(got))
    assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-5
    hf_ds = load_file(export_hf(runs / "ds", tmp_path / "hf_ds") / "model.safetensors")
    hf_native = load_file(export_hf(runs / "native", tmp_path / "hf_native") / "model.safetensors")
    assert hf_ds.keys() == hf_native.keys()
    assert max((hf_ds[k] - hf_native[k]).abs().max().item() for k in hf_ds) < 1e-5
    assert (tmp_path / "hf_ds" / "tokenizer.json").is_file()
    # switching engines through the trainer: init_from a DeepSpeed checkpoint on the native engine
    # starts from the same weights as init_from the native run's checkpoint; a full resume is refused
    from llmtrain.checkpoint import CheckpointError

    first = {}
    for src in ("ds", "native"):
        ft = make_config(
            *RUN, "trainer.max_steps=1", f"run.name=ft-{src}", f"checkpoint.init_from={runs / src}"
        )
        first[src] = _losses(Trainer(ft, DistEnv(0, 0, 1, 1)).train())[0]
        assert not list((runs / f"ft-{src}").glob(".from-*")), "the converted weights are cleaned up"
    assert abs(first["ds"] - first["native"]) / first["native"] < 1e-5
    assert first["ds"] < ref[0] - 0.05, (first, ref[0])  # trained weights, not a fresh init
    bad = make_config(*RUN, "trainer.max_steps=7", "run.name=resume-ds", f"checkpoint.resume={runs / 'ds'}")
    with pytest.raises(
        CheckpointError, match=r"written by the deepspeed engine, this run has parallel.backend=native"
    ):
        Trainer(bad, DistEnv(0, 0, 1, 1)).train()


def _ds_sft(rank: int, world: int, cfg) -> list[float]:
    return _losses(Trainer(cfg, DistEnv(rank, rank, world, world)).train())


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_sft_on_deepspeed_matches_native(make_config, tmp_path) -> None:
    """The SFT objective (packed prompt/response rows, loss on responses only) on DeepSpeed ZeRO-2 over
    2 ranks gives the native single-process losses: objectives are engine-independent."""
    from tests.objectives.common import addition_examples, write_jsonl

    data = write_jsonl(tmp_path / "add.jsonl", addition_examples())
    sft = [
        *RUN,
        "objective=sft",
        f"objective.sft.train_path={data}",
        "data.seq_len=48",
        "trainer.max_steps=4",
    ]
    ref = _losses(Trainer(make_config(*sft, "run.name=sft-native"), DistEnv(0, 0, 1, 1)).train())
    ds = make_config(*sft, "run.name=sft-ds", "parallel=zero2", "parallel.backend=deepspeed")
    r0, r1 = run_distributed(_ds_sft, world_size=2, args=(ds,), timeout=180)
    assert r0 == r1 and len(r0) == 4
    assert max(abs(a - b) / b for a, b in zip(r0, ref, strict=True)) < 1e-6, (r0, ref)
