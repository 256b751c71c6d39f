"""What the tools leave behind for a user: exported files readable as the umask says, and no torch
warnings on a plain single-process run."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str, *args: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=lambda: os.umask(umask),
    )


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_follow_the_umask(pretrained_run: Path, tmp_path: Path, umask: int, mode: int) -> None:
    out = tmp_path / "hf"
    run = _tool("export_hf.py", str(pretrained_run), str(out), "--max-shard-gb", "0.0001", umask=umask)
    assert run.returncode == 0, run.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert sum(n.endswith(".safetensors") for n in modes) > 1  # sharded: every shard is checked
    assert modes == dict.fromkeys(modes, mode), {n: oct(m) for n, m in modes.items()}


def test_generate_and_evaluate_print_no_warnings(pretrained_run: Path, shakespeare_dir: Path) -> None:
    gen = _tool("generate.py", str(pretrained_run), "--prompt", "ROMEO:", "--max-new-tokens", "8")
    assert gen.returncode == 0 and gen.stdout.startswith("ROMEO:"), gen.stderr
    ev = _tool("evaluate.py", str(pretrained_run), "--data", str(shakespeare_dir / "val"), "--batches", "2")
    assert ev.returncode == 0 and '"loss"' in ev.stdout, ev.stderr
    for run in (gen, ev):
        assert "Warning" not in run.stderr, run.stderr
