"""The objective and peft config groups compose from conf/ and reject mistakes naming the key."""

import pytest

from llmtrain.config import ConfigError
from llmtrain.testing import compose_config


def test_defaults_are_causal_lm_without_peft() -> None:
    cfg = compose_config()
    assert cfg.objective.name == "causal_lm" and cfg.peft.method == "none"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["objective=mlm"], "objective"),
        (
            ["objective.name=mlm"],
            r"objective\.name='mlm' is not allowed; choose one of: causal_lm, masked_lm, sft",
        ),
        (
            ["objective=masked_lm", "objective.masked_lm.mask_token_prob=0.95"],
            r"objective\.masked_lm\.mask_token_prob",
        ),
        (
            ["objective=masked_lm", "parallel.backend=deepspeed"],
            r"masked_lm runs on parallel\.backend=native",
        ),
        (
            ["objective=sft", "objective.sft.train_path=a", "objective.sft.chat_template=llama"],
            r"chat_template",
        ),
        (["objective=sft", "objective.sft.train_path=a", "parallel=pp2"], r"parallel\.pp=2"),
        (["objective=distill"], r"objective\.distill\.teacher"),
        (
            ["objective=distill", "objective.distill.teacher=x", "objective.distill.alpha=2"],
            r"distill\.alpha",
        ),
        (
            ["objective=distill", "objective.distill.teacher=x", "parallel=tp2", "model.n_kv_heads=2"],
            r"parallel\.tp=2",
        ),
        (["peft=lora", "checkpoint.init_from=x", "peft.rank=0"], r"peft\.rank"),
        (["peft=lora", "checkpoint.init_from=x", "peft.dropout=1.0"], r"peft\.dropout"),
        (["peft=lora", "checkpoint.init_from=x", "parallel.backend=deepspeed"], r"peft\.method"),
    ],
)
def test_mistakes_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(Exception, match=key) as e:
        compose_config(overrides)
    if overrides != ["objective=mlm"]:  # an unknown group option is Hydra's error, the rest are ours
        assert isinstance(e.value, ConfigError)


@pytest.mark.parametrize("group", ["objective=causal_lm", "objective=masked_lm", "peft=none"])
def test_group_options_compose(group: str) -> None:
    compose_config([group])


def test_sft_and_distill_options_compose_with_their_required_paths() -> None:
    assert compose_config(
        ["objective=sft", "objective.sft.train_path=x.jsonl"]
    ).objective.sft.train_roles == ["assistant"]
    cfg = compose_config(
        ["objective=distill", "objective.distill.teacher=runs/base", "peft=lora", "checkpoint.init_from=b"]
    )
    assert cfg.objective.distill.temperature == 2.0 and cfg.peft.target_modules == ["wq", "wv", "output"]
