"""End to end through `llmtrain`: the console names the event, events.jsonl holds it, and
resilience.nonfinite=stop ends the command with the reason."""

import json

from tests.test_cli import TINY, _cli


def test_cli_stop_on_nan_names_the_reason(shakespeare_dir, tmp_path):
    args = [*TINY, f"data.sources.0.path={shakespeare_dir}", f"run.root={tmp_path / 'runs'}", "run.name=nan"]
    args += ["tracking=none", "trainer.max_steps=4", "checkpoint.enabled=false", "resilience.nonfinite=stop"]
    out = _cli([*args, "resilience.inject_nan_steps=[1]"], tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "resilience: nonfinite at step 1 -> stop (loss=nan, grad_norm=nan, data_step=1" in text
    assert "resilience.nonfinite=stop: nonfinite at step 1" in text
    lines = (tmp_path / "runs" / "nan" / "events.jsonl").read_text().splitlines()
    assert [(e["step"], e["kind"], e["action"]) for e in map(json.loads, lines)] == [(1, "nonfinite", "stop")]
