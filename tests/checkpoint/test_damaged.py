"""A damaged newest checkpoint does not block the run: the resume sets it aside (renamed, never deleted),
warns naming it, and continues exactly from the newest intact one; an explicit checkpoint.resume=<older
step> is honoured and its requeues continue the branch; checksums in the manifest catch what sizes
cannot, in tools/inspect_checkpoint.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint import CheckpointManager, RankState, TrainerState, latest_checkpoint
from llmtrain.checkpoint.folder import COMPLETE, DAMAGED_MARK, verify_manifest
from tests.checkpoint.common import TINY, make_engine

ROOT = Path(__file__).resolve().parents[2]
INSPECT = [sys.executable, str(ROOT / "tools" / "inspect_checkpoint.py")]


def _cli(tmp_path: Path, shakespeare_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        *TINY,
        f"data.sources.0.path={shakespeare_dir}",
        f"run.root={tmp_path}",
        "run.name=r",
        "tracking=none",
        "checkpoint.every_steps=4",
        *extra,
    ]
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", *args],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=240,
    )


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_exactly(tmp_path, shakespeare_dir):
    first = _cli(tmp_path, shakespeare_dir, "trainer.max_steps=8")
    assert first.returncode == 0, first.stderr[-2000:]
    run, ckpts = tmp_path / "r", tmp_path / "r" / "checkpoints"
    straight = _log(run)
    newest = ckpts / "step_00000008"
    victim = sorted(json.loads((newest / COMPLETE).read_text())["files"])[0]
    (newest / victim).unlink()  # a file listed in the manifest is gone
    listing = subprocess.run([*INSPECT, str(run)], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 2 and "DAMAGED" in listing.stdout and "step_00000008" in listing.stdout
    again = _cli(tmp_path, shakespeare_dir, "trainer.max_steps=8")
    assert again.returncode == 0, again.stderr[-2000:]
    out = again.stdout + again.stderr
    assert "step_00000008 is damaged" in out and victim.split("/")[-1] in out and "set aside" in out
    aside = [p for p in ckpts.iterdir() if DAMAGED_MARK in p.name]
    assert len(aside) == 1 and (aside[0] / "DAMAGED.txt").is_file()  # kept, with the reason
    assert "resuming this run from" in out and "step 4" in out
    log = _log(run)  # steps 5-8 were trained again from step 4: exactly the same numbers
    assert [e["step"] for e in log] == list(range(1, 9))
    assert [(e["loss"], e["grad_norm"]) for e in log] == [(e["loss"], e["grad_norm"]) for e in straight]
    assert latest_checkpoint(ckpts).name == "step_00000008"  # saved anew, intact
    verify_manifest(latest_checkpoint(ckpts), checksums=True)


@pytest.mark.slow
def test_explicit_resume_of_an_older_step_is_honoured_and_its_requeue_continues(tmp_path, shakespeare_dir):
    assert _cli(tmp_path, shakespeare_dir, "trainer.max_steps=8").returncode == 0
    run, ckpts = tmp_path / "r", tmp_path / "r" / "checkpoints"
    straight = _log(run)
    older = ckpts / "step_00000004"
    back = _cli(
        tmp_path,
        shakespeare_dir,
        "trainer.max_steps=8",
        "checkpoint.every_steps=2",
        f"checkpoint.resume={older}",
    )
    assert back.returncode == 0, back.stderr[-2000:]
    out = back.stdout + back.stderr
    assert f"checkpoint.resume: starting from {older}" in out and "superseded" in out
    log = _log(run)
    assert [e["step"] for e in log] == list(range(1, 9))
    assert [(e["loss"], e["grad_norm"]) for e in log] == [(e["loss"], e["grad_norm"]) for e in straight]
    # the same command again (a requeue): the branch's own newest checkpoint, not step 4 again
    requeue = _cli(tmp_path, shakespeare_dir, "trainer.max_steps=10", f"checkpoint.resume={older}")
    assert requeue.returncode == 0, requeue.stderr[-2000:]
    assert "resuming this run from" in requeue.stdout + requeue.stderr
    assert [e["step"] for e in _log(run)] == list(range(1, 11))
    state = TrainerState.read(latest_checkpoint(ckpts))
    assert state.step == 10 and state.resume_origin == str(older.resolve())


def test_manifest_checksums_catch_a_flipped_byte_that_sizes_miss(make_config, tmp_path):
    cfg = make_config(*TINY)
    mgr = CheckpointManager(tmp_path / "ck")
    path = mgr.save(3, make_engine(cfg), TrainerState(), RankState(data={"consumed": 3})).path
    manifest = json.loads((path / COMPLETE).read_text())
    assert set(manifest["checksums"]) == set(manifest["files"])  # every file, each rank's own
    shard = next(p for p in (path / "model_optim").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify_manifest(path)  # sizes still match: a load would not notice
    res = subprocess.run([*INSPECT, str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "checksum" in res.stderr and shard.name in res.stderr


def test_incomplete_folders_removed_at_start_are_logged(make_config, tmp_path, caplog):
    from llmtrain.distributed.env import DistEnv
    from llmtrain.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = make_config(*TINY, "trainer.max_steps=1", "run.name=t")
    leftover = Path(cfg.run.root) / "t" / "checkpoints" / "step_00000005.tmp-dead"
    leftover.mkdir(parents=True)
    with caplog.at_level("INFO", logger="llmtrain"):
        Trainer(cfg, DistEnv(0, 0, 1, 1)).train()
    assert not leftover.exists()
    assert any(str(leftover) in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records)
