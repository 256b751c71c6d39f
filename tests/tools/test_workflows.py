"""The commands of docs/workflows.md and of README.md's fine-tune and planner blocks run as written,
in document order, on tiny settings: every `llmtrain ...` runs with a tiny model, 2 steps, batch 4
and 1 process in place of the documented sizes (every other key as written), `python tools/<x>.py ...` runs the
tool's main() with the documented arguments, anything else (`python -c ...`, `mkdir`) runs in bash.
Commands with `<placeholders>` and `torchrun` lines are the only ones skipped (counted below).

Training runs in this process (a fresh Trainer per command, from the same Hydra composition the CLI
does) so the whole walk stays within a minute; the first pretraining command goes through the real
`python -m llmtrain.cli` to keep the entry point itself covered.
"""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "model.dim": "32",
    "model.n_layers": "2",
    "model.n_heads": "2",
    "model.n_kv_heads": "1",
    "model.ffn_dim": "64",
    "data.seq_len": "32",
    "trainer.global_batch_size": "4",
    "trainer.micro_batch_size": "2",
    "trainer.max_steps": "2",
    "trainer.val_batches": "1",
    "trainer.num_threads": "1",
    "launcher.nproc": "1",
    "tracking": "none",
}


def documented_commands(doc: Path, after: str | None = None) -> list[str]:
    """Shell commands of the ```bash blocks of `doc` (below the heading `after`), continuation
    lines joined and comments cut."""
    text = doc.read_text()
    if after:
        text = text[text.index(after) :]
        text = text[: text.index("\n## ", 1)]
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line.split("  #")[0]).strip()  # comments follow two spaces
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def runnable(cmds: list[str]) -> tuple[list[str], list[str]]:
    skip = [c for c in cmds if "<" in c or c.startswith("torchrun")]
    return [c for c in cmds if c not in skip], skip


def tiny_overrides(words: list[str], data_dir: Path) -> list[str]:
    """The command's overrides with TINY in place of its sizes (steps, batch, model, processes) and
    the session's tokenized corpus as data unless the command names its own data."""
    keep = [w for w in words if w.split("=", 1)[0] not in TINY]
    own_data = any(w.startswith("data.sources") for w in words)
    data = [] if own_data else [f"data.sources.0.path={data_dir}"]
    return [*keep, *(f"{k}={v}" for k, v in TINY.items()), *data]


def run_command(cmd: str, data_dir: Path) -> str:
    """Run one documented command in the current folder; returns what it printed. `~` expands as a
    shell would expand it."""
    words = [os.path.expanduser(w) for w in shlex.split(cmd)]
    if words[0] == "llmtrain":
        from llmtrain.distributed.env import DistEnv
        from llmtrain.testing import compose_config
        from llmtrain.train.trainer import Trainer

        torch.set_num_threads(1)
        out = Trainer(compose_config(tiny_overrides(words[1:], data_dir)), DistEnv(0, 0, 1, 1)).train()
        assert out["status"] == "FINISHED" and out["step"] == 2, cmd
        return ""
    if words[:2] == ["python", words[1]] and words[1].startswith("tools/"):
        module = importlib.import_module("tools." + Path(words[1]).stem)
        from contextlib import redirect_stdout
        from io import StringIO

        buf = StringIO()
        with redirect_stdout(buf):
            code = module.main(words[2:])
        assert code == 0, f"{cmd}: exit {code}\n{buf.getvalue()}"
        return buf.getvalue()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, f"{cmd}\n{res.stdout}{res.stderr}"
    return res.stdout


@pytest.fixture
def workdir(tmp_path: Path, shakespeare_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder with data/, and a home folder whose default data cache
    (~/.cache/llmtrain/data, as the docs name it) holds the tokenized corpus."""
    (tmp_path / "data").mkdir()
    cache = tmp_path / "home" / ".cache" / "llmtrain" / "data"
    cache.mkdir(parents=True)
    (cache / "shakespeare-byte").symlink_to(shakespeare_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("LLMTRAIN_DATA_CACHE", "LLMTRAIN_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def cli_pretrain(cmd: str, data_dir: Path) -> None:
    """The first `llmtrain` command through the real CLI entry point (a subprocess)."""
    words = [os.path.expanduser(w) for w in shlex.split(cmd)]
    argv = [sys.executable, "-m", "llmtrain.cli", *tiny_overrides(words[1:], data_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "run finished at step 2" in res.stdout + res.stderr


@pytest.mark.slow
def test_workflows_md_commands_run_as_written(workdir: Path, shakespeare_dir: Path) -> None:
    cmds, skipped = runnable(documented_commands(ROOT / "docs" / "workflows.md"))
    assert len(skipped) == 2, skipped  # the 125m ZeRO-3 example on <your data>, torchrun on <arrow folder>
    assert len(cmds) == 25
    outputs, first_train = {}, True
    for cmd in cmds:
        if cmd.startswith("llmtrain") and first_train:
            cli_pretrain(cmd, shakespeare_dir)
            first_train = False
            continue
        outputs[cmd] = run_command(cmd, shakespeare_dir)
    # the arithmetic data set: 2,400 training and 100 held-out additions
    train_rows = (workdir / "data" / "instruct.jsonl").read_text().splitlines()
    assert (
        len(train_rows) == 2400
        and len((workdir / "data" / "instruct_val.jsonl").read_text().splitlines()) == 100
    )
    assert json.loads(train_rows[0]) == {"prompt": "Q: add 10 16\nA: ", "response": "26"}
    evals = {
        c: json.loads(o.strip().splitlines()[-1]) for c, o in outputs.items() if "tools/evaluate.py" in c
    }
    for cmd, res in evals.items():  # Arrow data: --batches x micro-batch 2 x seq 32 tokens
        if "shakespeare-byte/val" in cmd:
            batches = (
                int(shlex.split(cmd)[shlex.split(cmd).index("--batches") + 1]) if "--batches" in cmd else 8
            )
            assert res["tokens"] == batches * 2 * 32, cmd
        else:  # SFT pairs: response tokens only, each packed row once
            assert 0 < res["tokens"] < 4 * 32 and res["rows"] >= 1, cmd
    assert (workdir / "data" / "one_act" / "index.json").is_file()
    hf = workdir / "hf_out"
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    from llmtrain.data.chat import jinja_chat_template

    assert json.loads((hf / "tokenizer_config.json").read_text())["chat_template"] == jinja_chat_template(
        "chatml"
    )
    generated = [o for c, o in outputs.items() if "tools/generate.py" in c and "--chat" not in c]
    assert generated and all(o.startswith(("Q: add", "ROMEO:")) for o in generated)


@pytest.mark.slow
def test_readme_workflow_and_planner_commands_run_as_written(workdir: Path, shakespeare_dir: Path) -> None:
    setup, _ = runnable(documented_commands(ROOT / "docs" / "workflows.md", after="## 0."))
    for cmd in setup:  # the data the README commands read
        if not cmd.startswith(("llmtrain", "python tools/")):
            run_command(cmd, shakespeare_dir)
    cmds, skipped = runnable(documented_commands(ROOT / "README.md", after="## Fine-tune, evaluate, export"))
    plan = [c for c in documented_commands(ROOT / "README.md") if c.startswith("python tools/plan.py")]
    assert not skipped and len(cmds) == 7 and len(plan) == 2
    outputs = {cmd: run_command(cmd, shakespeare_dir) for cmd in [*cmds, *plan]}
    assert (workdir / "hf_out" / "model.safetensors").is_file()
    for cmd in plan:
        assert "configured layout dp" in outputs[cmd] and "best: parallel." in outputs[cmd]
