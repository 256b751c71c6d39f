"""Config composition and validation: mistakes are named with the key and the allowed values."""

import subprocess
import sys

import pytest

from llmtrain.config import ConfigError, batch_geometry
from llmtrain.config.schema import GROUP_SCHEMAS
from llmtrain.config.validate import check_override_keys
from llmtrain.testing import compose_config


def test_default_config_composes_and_is_typed():
    cfg = compose_config()
    assert cfg.model.name == "tiny" and cfg.parallel.backend == "native"
    assert isinstance(cfg.optim.lr, float) and cfg.data.sources[0].raw == "builtin:shakespeare"


@pytest.mark.parametrize("preset", ["tiny", "125m", "1b", "7b", "8b", "70b"])
def test_model_presets_compose(preset):
    assert compose_config([f"model={preset}"]).model.name == preset


@pytest.mark.parametrize("preset", ["ddp", "zero1", "zero2", "zero3", "hsdp", "tp2", "pp2", "tp2_pp2", "3d"])
def test_parallel_presets_compose(preset):
    compose_config([f"parallel={preset}"])


def test_unknown_override_key_lists_allowed_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        check_override_keys(["optim.lrr=1"], GROUP_SCHEMAS)
    msg = str(e.value)
    assert "optim.lrr" in msg and "Allowed keys" in msg and "'optim.lr'" in msg and "weight_decay" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="not a field of <root>"):
        check_override_keys(["modle.dim=3"], GROUP_SCHEMAS)


def test_group_choice_and_hydra_keys_pass_through():
    check_override_keys(["model=1b", "+foo=1", "hydra.verbose=true", "data.sources.0.path=x"], GROUP_SCHEMAS)


def test_wrong_type_is_rejected_naming_the_key():
    with pytest.raises(Exception, match=r"model\.dim"):
        compose_config(["model.dim=abc"])


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("optim.schedule=cosin", "optim.schedule", "cosine, wsd, linear, constant"),
        ("parallel.backend=fsdp", "parallel.backend", "native, deepspeed, megatron"),
        ("trainer.precision=fp8", "trainer.precision", "fp32, bf16"),
        ("parallel.pp_schedule=zb", "parallel.pp_schedule", "gpipe, 1f1b, interleaved_1f1b"),
    ],
)
def test_bad_choice_names_key_and_allowed_values(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        compose_config([override])
    assert key in str(e.value) and allowed in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.n_heads=3"], "model.dim"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["data.seq_len=4096"], "data.seq_len"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
    ],
)
def test_cross_field_rules_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(overrides)


def test_batch_geometry():
    cfg = compose_config(["trainer.global_batch_size=32", "trainer.micro_batch_size=4"])
    assert batch_geometry(cfg, 2) == 4
    with pytest.raises(ConfigError, match="global_batch_size"):
        batch_geometry(cfg, 3)


def test_cli_reports_config_error_before_starting(tmp_path):
    """The real CLI exits 2 with the message, and starts nothing (no run folder is created)."""
    out = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", f"run.root={tmp_path}", "optim.lrr=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "unknown config key 'optim.lrr'" in out.stderr and "optim.lr" in out.stderr
    assert not any(tmp_path.iterdir())
    out = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", f"run.root={tmp_path}", "optim.schedule=x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "choose one of: cosine" in out.stderr


def test_cli_checks_the_layout_against_the_world_size_before_spawning(tmp_path):
    """launcher.nproc fixes the world size in the launching process: a layout that cannot fit is a
    config error (exit 2, no run folder), not a crash inside the ranks."""
    out = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", f"run.root={tmp_path}", "parallel=tp2", "launcher.nproc=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "world size 3" in out.stderr and "tp=2" in out.stderr
    # nothing was written: no run folder, no resolved config, no data, no rank was started
    assert not any(tmp_path.rglob("*"))
