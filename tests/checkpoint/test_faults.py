"""Atomicity under real SIGKILLs at every phase of a save, and a full disk, in forked children.

The child process runs `CheckpointManager.save` with the fault hook (LLMTRAIN_CKPT_FAULT) killing it at
one phase; the parent then plays the restarted job: the newest complete checkpoint must be the
previous one (or the new one once its manifest is written), load bit-exactly, and leave no litter.
"""

import os
import resource
import signal

import pytest
import torch

from llmtrain.checkpoint import CheckpointError, CheckpointManager, latest_checkpoint
from llmtrain.checkpoint.folder import FAULT_ENV
from llmtrain.checkpoint.state import RankState, TrainerState
from tests.checkpoint.common import TINY, assert_same, make_engine, snapshot, step

PHASES = ["begin", "staged", "written", "renaming", "renamed", "complete"]  # "complete" last: it publishes


def _fork(fn) -> int:
    """Run fn in a forked child; returns its exit code (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except CheckpointError as e:
            (_fork.report).write_text(str(e))
            code = 3
        except BaseException as e:
            (_fork.report).write_text(repr(e))
            code = 4
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _save(mgr, engine, s):
    mgr.save(s, engine, TrainerState(tokens_seen=s), RankState(data={"consumed": s}))
    mgr.wait()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_at_every_phase_keeps_the_previous_checkpoint(make_config, tmp_path, monkeypatch, async_save):
    torch.set_num_threads(1)
    cfg = make_config(*TINY)
    _fork.report = tmp_path / "report.txt"
    eng = make_engine(cfg)
    step(eng)
    shm = tmp_path / "shm"
    mgr = CheckpointManager(tmp_path / "ck", keep_last=1, async_save=async_save, staging_dir=str(shm))
    _save(mgr, eng, 1)
    first = snapshot(eng)
    step(eng, seed=1)
    second = snapshot(eng)
    for phase in PHASES:
        monkeypatch.setenv(FAULT_ENV, f"kill:{phase}:2")
        assert _fork(lambda: _save(mgr, eng, 2)) == -signal.SIGKILL, phase
        monkeypatch.delenv(FAULT_ENV)
        # the requeued job: a new manager, stale folders cleaned, newest complete checkpoint loaded
        again = CheckpointManager(tmp_path / "ck", keep_last=1, async_save=async_save, staging_dir=str(shm))
        again.clean_stale()
        newest = latest_checkpoint(tmp_path / "ck")
        want_step, want = (2, second) if phase == "complete" else (1, first)
        assert newest.name == f"step_{want_step:08d}", phase
        fresh = make_engine(cfg)
        assert again.load(newest, fresh).step == want_step
        assert_same(snapshot(fresh), want)
        assert all(".tmp-" not in p.name for p in (tmp_path / "ck").iterdir()), phase
        assert not any(shm.rglob("*.distcp")), phase  # a killed async save's RAM staging is reclaimed
    _save(mgr, eng, 3)  # saving goes on normally afterwards; retention keeps only the newest
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_00000003"]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_full_disk_fails_the_save_cleanly(make_config, tmp_path, async_save):
    """RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG, as a full disk fails with ENOSPC."""
    torch.set_num_threads(1)
    cfg = make_config(*TINY)
    _fork.report = tmp_path / "report.txt"
    eng = make_engine(cfg)
    step(eng)
    mgr = CheckpointManager(tmp_path / "ck", async_save=async_save, staging_dir=str(tmp_path / "shm"))
    _save(mgr, eng, 1)
    saved = snapshot(eng)

    def child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        step(eng, seed=1)
        _save(mgr, eng, 2)

    assert _fork(child) == 3, _fork.report.read_text()
    msg = _fork.report.read_text()
    assert "checkpoint step 2" in msg and "previous checkpoint is kept" in msg and "File too large" in msg, (
        msg
    )
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step_00000001"]
    fresh = make_engine(cfg)
    CheckpointManager(tmp_path / "ck").load(latest_checkpoint(tmp_path / "ck"), fresh)
    assert_same(snapshot(fresh), saved)


def _one_rank_full_body(rank: int, world_size: int, overrides: list[str], folder: str) -> list:
    """Both ranks save step 1; then only rank 1's writes fail (EFBIG) while saving step 2."""
    from llmtrain.parallel import ParallelDims
    from llmtrain.parallel.build import build_engine
    from llmtrain.testing import compose_config

    cfg = compose_config(overrides)
    dims = ParallelDims(2, 1, 1, 1, 2)
    eng = build_engine(cfg, dims, dims.build_mesh("cpu"), torch.device("cpu"))
    step(eng)
    mgr = CheckpointManager(folder)
    _save(mgr, eng, 1)
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    step(eng, seed=1)
    try:
        _save(mgr, eng, 2)
    except CheckpointError as e:
        return ["error", str(e)]
    return ["saved", ""]


@pytest.mark.distributed
def test_full_disk_on_one_rank_fails_the_save_on_every_rank(make_config, shakespeare_dir, tmp_path):
    from tests.distributed import run_distributed

    overrides = [
        *TINY,
        f"data.sources.0.path={shakespeare_dir}",
        f"run.root={tmp_path}",
        "tracking=none",
        "parallel=ddp",
    ]
    out = run_distributed(_one_rank_full_body, 2, args=(overrides, str(tmp_path / "ck")), timeout=180)
    assert [r[0] for r in out] == ["error", "error"], out
    assert all("rank 1" in r[1] and "File too large" in r[1] for r in out), out
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step_00000001"]
    CheckpointManager(tmp_path / "ck").load(
        tmp_path / "ck" / "step_00000001", make_engine(make_config(*TINY))
    )
