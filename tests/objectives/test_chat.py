"""Chat and text handling around SFT: the exported tokenizer's chat template renders exactly what SFT
trained on, tools/generate.py keeps non-ASCII prompts and has a --chat mode, and SFT validation
scores each held-out row once however many val batches are asked for."""

from pathlib import Path

import pytest

from llmtrain.config.objective import SFTConfig
from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.objectives.sft_data import render_chat_prompt, render_example
from tests.objectives.common import addition_examples, tiny_config, write_jsonl

TOK = ByteTokenizer()
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Café?"},
    {"role": "assistant", "content": "Oui: 2 € ☕"},
    {"role": "user", "content": "add 2 3"},
    {"role": "assistant", "content": "5"},
]


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_exported_chat_template_renders_what_sft_trained_on(tmp_path: Path, template: str) -> None:
    transformers = pytest.importorskip("transformers")
    from llmtrain.checkpoint.hf_tokenizer import export_tokenizer, sft_chat_template

    config = {"objective": {"name": "sft", "sft": {"chat_template": template}}}
    what, ids = export_tokenizer("byte", tmp_path, 64, sft_chat_template(config))
    assert ids and "chat template" in what
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    trained = render_example({"messages": CHAT}, SFTConfig(chat_template=template), TOK).tokens
    # the text of the conversation, then the EOS id that SFT appends (the template cannot render it:
    # the tokenizer never makes special tokens from text, see llmtrain.data.chat)
    assert hf.apply_chat_template(CHAT, tokenize=True, return_dict=False) + [hf.eos_token_id] == trained
    # the generation prompt: the conversation so far plus the assistant header, no EOS
    prompt = hf.apply_chat_template(CHAT[:4], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prompt == render_chat_prompt(CHAT[:4], template, TOK)
    header = "<|im_start|>assistant\n" if template == "chatml" else "assistant: "
    assert TOK.decode(prompt).endswith(
        "add 2 3" + ("<|im_end|>\n" if template == "chatml" else "\n") + header
    )
    # only a chat-tuned run gets a template
    assert sft_chat_template({"objective": {"name": "causal_lm", "sft": {"chat_template": template}}}) is None


def test_generate_keeps_non_ascii_prompts(pretrained_run: Path, capsys: pytest.CaptureFixture) -> None:
    from tools.generate import main, unescape

    assert unescape("Café \\u00e9 日本\\n\\tx") == "Café é 日本\n\tx"
    assert main([str(pretrained_run), "--prompt", "Café 日本\\n", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Café 日本\n")  # not "CafÃ©"


def test_generate_chat_mode_prompts_with_the_sft_template(
    pretrained_run: Path, capsys: pytest.CaptureFixture
) -> None:
    from llmtrain.distributed.env import DistEnv
    from llmtrain.objectives.inference import generate, load_checkpoint_engine
    from tools.generate import main

    assert main([str(pretrained_run), "--chat", "--prompt", "add 2 3", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    loaded = load_checkpoint_engine(str(pretrained_run), DistEnv(0, 0, 1, 1))
    ids = render_chat_prompt([{"role": "user", "content": "add 2 3"}], "chatml", TOK)
    assert TOK.decode(ids) == "<|im_start|>user\nadd 2 3<|im_end|>\n<|im_start|>assistant\n"
    new = generate(loaded.model, ids, max_new_tokens=6, max_seq_len=64, eos_id=TOK.eos_id)
    reply = TOK.decode([i for i in new if i != TOK.eos_id]).split("<|im_end|>\n")[0]
    assert out == reply + "\n"


def test_sft_validation_scores_each_row_once(shakespeare_dir: Path, tmp_path: Path) -> None:
    """3 val examples pack into 1 row; 4 val batches x 2 rows would score it 8 times by wrapping."""
    from llmtrain.objectives import SupervisedFineTuning

    rows = addition_examples()
    train_path = write_jsonl(tmp_path / "train.jsonl", rows)
    val_path = write_jsonl(tmp_path / "val.jsonl", rows[:3])
    cfg = tiny_config(
        shakespeare_dir,
        tmp_path,
        "objective=sft",
        f"objective.sft.train_path={train_path}",
        f"objective.sft.val_path={val_path}",
        "data.seq_len=64",
    )
    _, val = SupervisedFineTuning(cfg, 0, 1).build_loaders(micro_batch_size=2, grad_accum=1)
    assert val.num_samples == 1
    scored = sum(int(b.num_tokens) for _ in range(4) for b in val.next_step())
    # each example's trained next-token targets: its response digits and EOS (2 or 3 per example)
    expected = sum(sum(render_example(r, cfg.objective.sft, TOK).trained[1:]) for r in rows[:3])
    assert expected == 6  # 0+0, 0+1, 0+2: one digit + EOS each
    assert scored == expected
