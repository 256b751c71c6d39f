"""Exact resume: 2N steps straight == N steps, stop, resume, N steps (bitwise on CPU), in one process
(graceful SIGTERM stop, sync and async saves) and on 2 DDP ranks with a rank SIGKILLed mid-save;
resharding dp=2 -> dp=1 and -> ZeRO-3 on 2 ranks; fine-tuning from another run's weights."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint import latest_checkpoint
from llmtrain.checkpoint.folder import FAULT_ENV
from llmtrain.distributed.env import DistEnv
from llmtrain.train.trainer import Trainer
from tests.checkpoint.common import TINY
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
RUN = [*TINY, "trainer.max_steps=8", "checkpoint.every_steps=4"]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _train(make_config, *overrides: str) -> dict:
    cfg = make_config(*RUN, *overrides)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        return Trainer(cfg, DistEnv(0, 0, 1, 1)).train()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_stop_and_resume_reproduces_the_straight_run_bitwise(make_config, monkeypatch, tmp_path, async_save):
    torch.set_num_threads(1)
    extra = [f"checkpoint.async_save={async_save}", f"checkpoint.async_staging_dir={tmp_path / 'shm'}"]
    straight = _train(make_config, "run.name=straight", *extra)
    assert straight["status"] == "FINISHED" and straight["step"] == 8
    # SIGTERM (as SLURM's pre-timeout) while step 4 is being saved: the save completes, the loop stops
    monkeypatch.setenv(FAULT_ENV, "term:staged:4")
    stopped = _train(make_config, "run.name=resumed", *extra)
    monkeypatch.delenv(FAULT_ENV)
    assert stopped["status"] == "KILLED" and stopped["step"] == 4
    resumed = _train(make_config, "run.name=resumed", *extra)
    assert resumed["status"] == "FINISHED" and resumed["history"][0]["step"] == stopped["step"] + 1
    run_dir = Path(straight["run_dir"]).parent
    got, want = _log(run_dir / "resumed"), _log(run_dir / "straight")
    assert [e["step"] for e in got] == list(range(1, 9))
    assert [(e["loss"], e["grad_norm"], e["lr"]) for e in got] == [
        (e["loss"], e["grad_norm"], e["lr"]) for e in want
    ]
    state = json.loads(
        (latest_checkpoint(run_dir / "resumed" / "checkpoints") / "trainer_state.json").read_text()
    )
    assert state["step"] == 8 and state["tokens_seen"] == 8 * 4 * 32 and state["ranks"][0]["data"]
    assert state["config"]["checkpoint"]["async_save"] is async_save and "rng" in state["ranks"][0]


def test_init_from_loads_weights_only_and_starts_at_step_zero(make_config, tmp_path):
    torch.set_num_threads(1)
    base = _train(make_config, "run.name=base")
    tuned = _train(
        make_config, "run.name=tuned", "trainer.max_steps=2", f"checkpoint.init_from={base['run_dir']}"
    )
    fresh = _train(make_config, "run.name=fresh", "trainer.max_steps=2")
    assert [h["step"] for h in tuned["history"]] == [1, 2]
    # same first batch: the fine-tuned run starts from the trained weights, so its loss is lower
    assert tuned["history"][0]["loss"] < base["history"][0]["loss"] == fresh["history"][0]["loss"]
    again = _train(
        make_config, "run.name=tuned", "trainer.max_steps=3", f"checkpoint.init_from={base['run_dir']}"
    )
    assert [h["step"] for h in again["history"]] == [3]  # its own checkpoint wins over init_from


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_ddp_rank_killed_mid_save_resumes_exactly_and_reshards(make_config, shakespeare_dir, tmp_path):
    """2 ranks train 8 steps; rank 1 is SIGKILLed while writing the step-8 checkpoint in the background
    (torchrun then stops rank 0). The rerun resumes from step 4 and must reproduce steps 5-8 bitwise; the step-4 checkpoint
    also loads on 1 process (dp=1, 2x accumulation) and on 2 ZeRO-3 ranks with the same next losses up to
    fp32 reduction order."""
    torch.set_num_threads(1)
    args = [
        *RUN,
        f"data.sources.0.path={shakespeare_dir}",
        f"run.root={tmp_path}",
        "run.name=ddp",
        "tracking=none",
        "launcher.nproc=2",
    ]
    # the killed run saves asynchronously (background commit over its own gloo group), the rerun synchronously
    killed = _cli(
        [*args, "checkpoint.async_save=true", f"checkpoint.async_staging_dir={tmp_path / 'shm'}"],
        {FAULT_ENV: "kill:written:8:1"},
    )
    # the launcher's one line names rank 1 killed by SIGKILL (rank 0 may follow, failing on its dead peer)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert re.search(r"llmtrain: .*\brank 1 was killed by SIGKILL", killed.stderr), killed.stderr[-3000:]
    ckpts = tmp_path / "ddp" / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step_00000004"
    first = _log(tmp_path / "ddp")
    assert [e["step"] for e in first] == list(range(1, 9))  # it trained to 8, the save of 8 died
    done = _cli(args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    log = _log(tmp_path / "ddp")  # the trainer drops the entries past the resumed step, the rerun appends
    assert [e["step"] for e in log] == list(range(1, 9)) and log[:4] == first[:4], done.stderr[-3000:]
    rerun = log[4:]
    assert [(e["loss"], e["grad_norm"]) for e in rerun] == [(e["loss"], e["grad_norm"]) for e in first[4:]]
    assert latest_checkpoint(ckpts).name == "step_00000008"
    one = _train(make_config, "run.name=dp1", f"checkpoint.resume={ckpts / 'step_00000004'}")
    assert [h["step"] for h in one["history"]] == [5, 6, 7, 8]
    for got, want in zip(one["history"], first[4:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    # and onto 2 ranks of ZeRO-3 (FSDP2 shards of the replicated DDP state)
    base = [a for a in args if not a.startswith(("run.name=", "launcher.nproc="))]
    zero3 = run_distributed(
        _train_body,
        2,
        timeout=240,
        args=([*base, "run.name=zero3", "parallel=zero3", f"checkpoint.resume={ckpts / 'step_00000004'}"],),
    )
    assert zero3[0] == zero3[1] and len(zero3[0]) == 4
    for got, want in zip(zero3[0], first[4:]):
        assert got == pytest.approx(want["loss"], rel=1e-5)


def _train_body(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    from llmtrain.distributed.env import detect_env
    from llmtrain.testing import compose_config

    return [h["loss"] for h in Trainer(compose_config(overrides), detect_env()).train()["history"]]


def test_resume_from_a_step_0_checkpoint_is_exact(make_config):
    """A job stopped before its first step (an early time-limit signal, a preemption during start-up)
    saves step_00000000; resuming from it must train exactly like a run that never stopped. It did
    not: torch's state-dict helpers initialised the empty AdamW with a zero-gradient step, so Adam's
    step count was off by one (loss 5.724 vs 5.741 at step 2)."""
    torch.set_num_threads(1)
    straight = _train(make_config, "run.name=straight", "trainer.max_steps=4")
    cfg = make_config(*RUN, "run.name=early", "trainer.max_steps=4")
    early = Trainer(cfg, DistEnv(0, 0, 1, 1))
    early.stop.set("time limit during start-up")
    stopped = early.train()
    assert stopped["status"] == "KILLED" and stopped["step"] == 0
    assert latest_checkpoint(Path(stopped["run_dir"]) / "checkpoints").name == "step_00000000"
    resumed = _train(make_config, "run.name=early", "trainer.max_steps=4")
    run_dir = Path(straight["run_dir"]).parent
    got, want = _log(run_dir / "early"), _log(run_dir / "straight")
    assert [(e["step"], e["loss"], e["grad_norm"]) for e in got] == [
        (e["step"], e["loss"], e["grad_norm"]) for e in want
    ]
    assert resumed["history"][0]["step"] == 1


def test_a_changed_schedule_is_announced_on_resume(make_config, caplog):
    """Raising trainer.max_steps moves the LR of the resumed step (cosine horizon); say so, with the
    old and new horizon and LR, instead of a silent jump."""
    torch.set_num_threads(1)
    _train(make_config, "run.name=grow", "trainer.max_steps=4")
    with caplog.at_level("INFO", logger="llmtrain"):
        _train(make_config, "run.name=grow", "trainer.max_steps=8")
    msgs = [r.getMessage() for r in caplog.records if "LR schedule changed" in r.getMessage()]
    assert len(msgs) == 1 and "trainer.max_steps 4 -> 8" in msgs[0], msgs
    old, new = (float(x) for x in re.findall(r"LR at step 4 (\S+) -> (\S+)", msgs[0])[0])
    assert new > old  # cosine at 4 of 4 is the floor; at 4 of 8 it is half-way
    caplog.clear()
    with caplog.at_level("INFO", logger="llmtrain"):
        _train(make_config, "run.name=grow", "trainer.max_steps=8")  # nothing changed: nothing said
    assert not [r for r in caplog.records if "LR schedule changed" in r.getMessage()]
