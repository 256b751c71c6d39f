"""LoRA: only adapters train and are checkpointed, merged weights reproduce base + adapters, runs
resume exactly, and a merged checkpoint exports/evaluates like the adapted model."""

from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint.weights import saved_model_keys
from llmtrain.models import build_model
from llmtrain.models.lora import LoRALinear, apply_lora, init_lora, is_adapter, merge_lora, merge_lora_state
from llmtrain.optim import param_groups
from llmtrain.testing import compose_config
from tests.objectives.common import losses, tiny_config, train

MODEL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64"]


def lora_model(targets: list[str], seed: int = 0) -> torch.nn.Module:
    model = build_model(compose_config(MODEL).model, device="meta")
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules=targets)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    init_lora(model, seed)
    return model


def test_only_adapters_are_trainable_and_optimized() -> None:
    model = lora_model(["wq", "wv", "w2"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(n) for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # A and B x 3 targets x 2 layers
    optimized = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if p.requires_grad}


def test_adapters_start_at_zero_update_and_merge_exactly() -> None:
    base = build_model(compose_config(MODEL).model, device="cpu")
    base.init_weights(0)
    model = lora_model(["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"])
    tokens = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(tokens), base(tokens))  # B = 0 and the same base init: the base model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    adapted = model(tokens)
    assert not torch.allclose(adapted, base(tokens))
    state = merge_lora_state({k: v.clone() for k, v in model.state_dict().items()}, scaling=8.0 / 4)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(tokens), adapted, rtol=1e-5, atol=1e-5)
    assert state.keys() == merged.state_dict().keys()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(state[k], v)


def test_no_target_matches_names_the_key() -> None:
    model = build_model(compose_config(MODEL).model, device="meta")
    with pytest.raises(ValueError, match=r"peft\.target_modules"):
        apply_lora(model, 4, 8.0, 0.0, ["q_proj"])


def test_lora_config_validation(shakespeare_dir, tmp_path) -> None:
    from llmtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"peft\.target_modules"):
        tiny_config(
            shakespeare_dir, tmp_path, "peft=lora", "peft.target_modules=[q_proj]", "checkpoint.init_from=x"
        )
    with pytest.raises(ConfigError, match=r"checkpoint\.init_from"):
        tiny_config(shakespeare_dir, tmp_path, "peft=lora")
    with pytest.raises(ConfigError, match=r"peft\.method"):
        tiny_config(
            shakespeare_dir,
            tmp_path,
            "peft=lora",
            "parallel=tp2",
            "model.n_kv_heads=2",
            "checkpoint.init_from=x",
        )


def lora_run(data: Path, root: Path, base: Path, name: str, steps: int, *extra: str) -> dict:
    return train(
        tiny_config(
            data,
            root,
            "peft=lora",
            f"checkpoint.init_from={base}",
            f"run.name={name}",
            f"trainer.max_steps={steps}",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
            *extra,
        )
    )


def test_lora_run_trains_adapters_only_checkpoints_them_and_resumes(
    shakespeare_dir, tmp_path, pretrained_run
) -> None:
    from llmtrain.checkpoint import latest_checkpoint

    straight = losses(lora_run(shakespeare_dir, tmp_path, pretrained_run, "straight", 8))
    first = losses(lora_run(shakespeare_dir, tmp_path, pretrained_run, "resumed", 5))
    second = losses(lora_run(shakespeare_dir, tmp_path, pretrained_run, "resumed", 8))
    assert first + second == straight  # bitwise: the base is reloaded from init_from, adapters from the run
    assert straight[-1] < straight[0]
    ckpt = latest_checkpoint(tmp_path / "straight" / "checkpoints")
    keys = saved_model_keys(ckpt / "model_optim")
    assert keys and all(is_adapter(k) for k in keys)
    base_size = sum(f.stat().st_size for f in (latest_checkpoint(pretrained_run / "checkpoints")).rglob("*"))
    assert sum(f.stat().st_size for f in ckpt.rglob("*")) < base_size / 2


def test_merged_checkpoint_matches_the_adapted_model(shakespeare_dir, tmp_path, pretrained_run) -> None:
    from llmtrain.checkpoint.lora_merge import merge_lora_checkpoint
    from llmtrain.distributed.env import DistEnv
    from llmtrain.objectives.inference import load_checkpoint_engine

    lora_run(shakespeare_dir, tmp_path, pretrained_run, "ft", 4, "peft.target_modules=[wq,wv,w2,output]")
    merged = merge_lora_checkpoint(tmp_path / "ft", tmp_path / "merged")
    adapted = load_checkpoint_engine(tmp_path / "ft", DistEnv(0, 0, 1, 1), device="cpu")
    plain = load_checkpoint_engine(merged, DistEnv(0, 0, 1, 1), device="cpu")
    assert not any(isinstance(m, LoRALinear) for m in plain.model.modules())
    tokens = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain.model(tokens), adapted.model(tokens), rtol=1e-5, atol=1e-5)
    exported = adapted.engine.full_model_state()  # what an export sees: adapters folded in
    assert not any(is_adapter(k) for k in exported)
    for k, v in plain.model.state_dict().items():
        if k in exported:
            torch.testing.assert_close(exported[k], v)
    # the HF export of the LoRA run itself merges first: identical safetensors to exporting `merged`
    from safetensors.torch import load_file

    from llmtrain.checkpoint.convert import export_hf

    direct = load_file(export_hf(tmp_path / "ft", tmp_path / "hf_direct") / "model.safetensors")
    via_merge = load_file(export_hf(merged, tmp_path / "hf_merged") / "model.safetensors")
    assert direct.keys() == via_merge.keys() and all(torch.equal(direct[k], via_merge[k]) for k in direct)


def test_the_base_of_a_lora_run_is_pinned_when_it_trains_on(shakespeare_dir, tmp_path) -> None:
    """init_from=<run folder> resolves once: after the base run trains 4 more steps, the same LoRA
    checkpoint exports the same weights (it exported different ones, max diff 1e-3), its resume loads the
    same base, and a base rewritten under the pin is refused naming both fingerprints."""
    from safetensors.torch import load_file

    from llmtrain.checkpoint import TrainerState, latest_checkpoint
    from llmtrain.checkpoint.convert import export_hf
    from llmtrain.checkpoint.pin import PIN_FILE
    from llmtrain.tracking.tracker import run_tags
    from llmtrain.train.trainer import Trainer

    base = tmp_path / "base"
    base_cfg = ["run.name=base", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]
    train(tiny_config(shakespeare_dir, tmp_path, *base_cfg, "trainer.max_steps=2"))
    pinned = latest_checkpoint(base / "checkpoints")
    first = losses(lora_run(shakespeare_dir, tmp_path, base, "ft", 3))
    lora_ckpt = latest_checkpoint(tmp_path / "ft" / "checkpoints")
    pin = TrainerState.read(lora_ckpt).init_from
    assert pin is not None and pin.path == str(pinned.resolve()) and pin.spec == str(base)
    assert (tmp_path / "ft" / PIN_FILE).is_file()
    before = load_file(export_hf(tmp_path / "ft", tmp_path / "hf1") / "model.safetensors")
    train(tiny_config(shakespeare_dir, tmp_path, *base_cfg, "trainer.max_steps=6"))  # the base trains on
    assert latest_checkpoint(base / "checkpoints") != pinned
    after = load_file(export_hf(tmp_path / "ft", tmp_path / "hf2") / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    on_pinned = losses(lora_run(shakespeare_dir, tmp_path, pinned, "ref", 5))  # straight, on the step-2 base
    resumed = losses(lora_run(shakespeare_dir, tmp_path, base, "ft", 5))  # resumes: base still step 2
    assert first + resumed == on_pinned  # bitwise: the resume did not pick up the newer base
    cfg = tiny_config(shakespeare_dir, tmp_path, "peft=lora", f"checkpoint.init_from={base}", "run.name=ft")
    trainer = Trainer(cfg, __import__("llmtrain.distributed.env", fromlist=["DistEnv"]).DistEnv(0, 0, 1, 1))
    trainer.maybe_resume()
    assert run_tags(trainer)["init_from"] == pin.describe()  # shown in MLflow as a run tag
    (pinned / "COMPLETE").write_text((pinned / "COMPLETE").read_text().replace('"step": 2', '"step":2'))
    with pytest.raises(ValueError, match=f"changed since this run was pinned.*{pin.fingerprint}"):
        lora_run(shakespeare_dir, tmp_path, base, "ft", 6)
    other = tiny_config(
        shakespeare_dir, tmp_path, "peft=lora", f"checkpoint.init_from={pinned}", "run.name=ft"
    )
    with pytest.raises(ValueError, match="but this run was started from"):
        train(other)


def test_lora_reports_trainable_share_and_mfu_counts_frozen_weights_at_4n(
    shakespeare_dir, tmp_path, pretrained_run, caplog, monkeypatch
) -> None:
    """Tiny model (dim 32, 2 layers, q 32, kv 16, ffn 64, vocab 320, untied): 2 x (1024 + 2 x 512 +
    1024 + 3 x 2048 + 2 x 32 norms) + 2 x 320 x 32 + 32 = 39,072 base parameters; the default r 8
    adapters on wq (8 x (32 + 32)) and wv (8 x (32 + 16)) in both layers (1,792) and on the output
    head (8 x (32 + 320) = 2,816) = 4,608 trainable, 10.55% of 43,680. The count goes to the console
    and to MLflow; the Meter's FLOPs are the LoRA ones."""
    import mlflow

    from llmtrain.models import model_args
    from llmtrain.train.flops import flops_per_token, lora_flops_per_token

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    from llmtrain.distributed.env import DistEnv
    from llmtrain.train.trainer import Trainer

    cfg = tiny_config(
        shakespeare_dir,
        tmp_path,
        "peft=lora",
        f"checkpoint.init_from={pretrained_run}",
        "run.name=share",
        "trainer.max_steps=1",
        "tracking=mlflow",
        f"tracking.uri={uri}",
        "tracking.system_metrics=false",
    )
    torch.set_num_threads(1)
    with caplog.at_level("INFO", logger="llmtrain"):
        trainer = Trainer(cfg, DistEnv(0, 0, 1, 1))
        trainer.train()
    assert "peft.method=lora: training 4,608 of 43,680 parameters (10.55%)" in caplog.text
    run_id = (tmp_path / "share" / "mlflow_run_id.txt").read_text().strip()
    metrics = mlflow.MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics["params/trainable"] == 4608 and metrics["params/total"] == 43680
    assert metrics["params/trainable_share"] == pytest.approx(4608 / 43680)
    args = model_args(cfg.model)
    assert trainer.meter.flops_per_token == lora_flops_per_token(args, 32, 8, ["wq", "wv", "output"])
    assert trainer.meter.flops_per_token < 0.85 * flops_per_token(args, 32)  # 159,744 vs 196,608


def test_lora_export_creates_missing_parent_folders(shakespeare_dir, tmp_path, pretrained_run) -> None:
    from safetensors.torch import load_file

    from llmtrain.checkpoint.convert import export_hf

    lora_run(shakespeare_dir, tmp_path, pretrained_run, "ex", 2)
    out = export_hf(tmp_path / "ex", tmp_path / "not" / "yet" / "hf")
    assert out == tmp_path / "not" / "yet" / "hf"
    assert len(load_file(out / "model.safetensors")) == 2 * 9 + 3  # 9 per block + embedding, norm, head
