"""CheckpointManager in one process: round trip, retention, resume policy, cadence, bad input."""

import json
import os
import pickle
import time

import pytest
import torch

from llmtrain.checkpoint import CheckpointError, CheckpointManager, latest_checkpoint, list_checkpoints
from llmtrain.checkpoint.dcp_io import read_metadata
from llmtrain.checkpoint.folder import COMPLETE, write_manifest
from llmtrain.checkpoint.manager import retained_steps
from llmtrain.checkpoint.policy import SaveSchedule, check_model_matches, plan_resume
from llmtrain.checkpoint.state import RankState, TrainerState
from tests.checkpoint.common import TINY, assert_same, make_engine, snapshot, step


@pytest.fixture
def cfg(make_config):
    torch.set_num_threads(1)
    return make_config(*TINY)


def _save(mgr, engine, s):
    return mgr.save(s, engine, TrainerState(tokens_seen=s * 10), RankState(data={"consumed": s}))


def test_round_trip_restores_model_and_optimizer_exactly(cfg, tmp_path):
    eng = make_engine(cfg)
    step(eng)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    res = _save(mgr, eng, 1)
    assert res.done.result() == tmp_path / "step_00000001" and list_checkpoints(tmp_path) == [(1, res.path)]
    saved = snapshot(eng)
    manifest = json.loads((res.path / COMPLETE).read_text())
    assert {"trainer_state.json", "rng/rank_00000.pt", "model_optim/.metadata"} <= set(manifest["files"])
    step(eng, seed=1)  # move away, then load back into a fresh engine and into the moved one
    for target in (make_engine(cfg), eng):
        state = mgr.load(res.path, target)
        assert (state.step, state.tokens_seen, state.ranks) == (1, 10, [RankState(data={"consumed": 1})])
        assert_same(snapshot(target), saved)
    fresh = make_engine(cfg)
    mgr.load(res.path, fresh, load_optimizer=False)  # weights only: optimizer stays empty
    assert not fresh.optimizer.state and torch.equal(fresh.model.output.weight, eng.model.output.weight)


def test_async_save_writes_the_state_of_the_save_step_while_training_goes_on(cfg, tmp_path):
    """The native engine's snapshot is a host copy: training steps taken while the background write
    runs must not leak into the checkpoint, and the loop is blocked only for the copy."""
    eng = make_engine(cfg)
    step(eng)
    mgr = CheckpointManager(
        tmp_path / "ckpt", keep_last=2, async_save=True, staging_dir=str(tmp_path / "shm")
    )
    res = _save(mgr, eng, 1)
    saved = snapshot(eng)
    step(eng, seed=1)  # mutates parameters and optimizer moments in place during the write
    step(eng, seed=2)
    assert mgr.wait() == tmp_path / "ckpt" / "step_00000001"
    fresh = make_engine(cfg)
    mgr.load(res.path, fresh)
    assert_same(snapshot(fresh), saved)
    # deterministic form of the same property: the snapshot's writer runs only after two more steps
    write = eng.snapshot()
    before = snapshot(eng)
    step(eng, seed=3)
    write(tmp_path / "direct", None)
    other = make_engine(cfg)
    other.load(tmp_path / "direct")
    assert_same(snapshot(other), before)


def test_retention_keep_last_and_keep_every(cfg, tmp_path):
    assert retained_steps([10, 20, 30, 40, 50], 2, 0) == {40, 50}
    assert retained_steps([10, 20, 30, 40, 50], 2, 20) == {20, 40, 50}
    assert retained_steps([7], 1, 5) == {7}  # the newest survives whatever the policy
    eng = make_engine(cfg)
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_every=3)
    (tmp_path / "step_00000099.tmp-dead").mkdir(parents=True)  # a killed save's leftover
    (tmp_path / "step_00000098").mkdir()  # renamed but never marked complete
    for s in range(1, 8):
        _save(mgr, eng, s)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000006", "step_00000007"]


def test_resume_policy(cfg, tmp_path):
    eng = make_engine(cfg)
    other = CheckpointManager(tmp_path / "other")
    _save(other, eng, 5)
    ck, own = cfg.checkpoint, tmp_path / "own"
    assert plan_resume(ck, own).path is None
    ck.init_from = str(tmp_path / "other")  # a run folder resolves to its newest checkpoint
    plan = plan_resume(ck, own)
    assert (plan.path.name, plan.full_state, plan.load_optimizer) == ("step_00000005", False, False)
    ck.resume = str(tmp_path / "other" / "step_00000005")
    assert plan_resume(ck, own).full_state
    mgr = CheckpointManager(own)
    _save(mgr, eng, 2)  # a checkpoint of this run that did not come from that branch
    plan = plan_resume(ck, own)
    assert plan.path == tmp_path / "other" / "step_00000005" and plan.notes  # explicit resume honoured
    origin = str((tmp_path / "other" / "step_00000005").resolve())
    mgr.save(6, eng, TrainerState(resume_origin=origin), RankState())  # saved by that branch
    assert plan_resume(ck, own).path == own / "step_00000006"  # a requeue continues the branch
    ck.resume = "none"
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        plan_resume(ck, own)
    ck.resume = str(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="nothing"):
        plan_resume(ck, tmp_path / "empty")


def test_model_shape_mismatch_names_the_keys(cfg, tmp_path):
    with pytest.raises(CheckpointError, match=r"model.dim: checkpoint 64 vs run 32"):
        check_model_matches({"model": {"dim": 64, "n_layers": 2}}, cfg.model, tmp_path)
    check_model_matches({"model": {"dim": 32, "max_seq_len": 4}}, cfg.model, tmp_path)


def test_time_based_schedule(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    sched = SaveSchedule(every_steps=0, every_minutes=2)
    assert not sched.due(1)
    now[0] += 121
    assert sched.due(2)
    sched.saved()
    assert not sched.due(3)
    assert SaveSchedule(every_steps=5, every_minutes=0).due(10)


def test_truncated_or_foreign_checkpoints_name_the_file(cfg, tmp_path):
    eng = make_engine(cfg)
    mgr = CheckpointManager(tmp_path / "ck")
    path = _save(mgr, eng, 1).path
    with pytest.raises(CheckpointError, match="no complete llmtrain checkpoint"):
        mgr.load(tmp_path / "somewhere", eng)
    foreign = tmp_path / "hf" / "step_00000001"
    foreign.mkdir(parents=True)
    (foreign / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"{foreign}.*no COMPLETE"):
        mgr.load(foreign, eng)
    shard = path / "model_optim" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{shard}: 1000 bytes, the manifest recorded"):
        mgr.load(path, eng)
    write_manifest(path, 1)  # even with a consistent manifest the byte ranges are checked
    with pytest.raises(CheckpointError, match=f"{shard}: 1000 bytes, but item .* needs"):
        mgr.load(path, eng)
    (path / "trainer_state.json").write_text('{"step": 1}')
    write_manifest(path, 1)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: not an llmtrain trainer state"):
        mgr.load(path, eng)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_never_unpickles_arbitrary_objects(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eng = make_engine(cfg)
    mgr = CheckpointManager(tmp_path / "ck")
    path = _save(mgr, eng, 1).path
    assert read_metadata(path / "model_optim").state_dict_metadata  # the real metadata passes
    (path / "model_optim" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    write_manifest(path, 1)  # a tampered folder that is otherwise consistent
    with pytest.raises(
        CheckpointError, match=r"\.metadata: unreadable or foreign DCP metadata.*posix.system"
    ):
        mgr.load(path, eng)
    assert not (tmp_path / "pwned").exists()
    rng = path / "rng" / "rank_00000.pt"
    torch.save({"cpu": _Evil()}, rng)
    with pytest.raises(pickle.UnpicklingError):  # the RNG file goes through weights_only=True
        from llmtrain.checkpoint.rng import restore_rng

        restore_rng(rng, None)
    assert not (tmp_path / "pwned").exists()
    assert latest_checkpoint(tmp_path / "ck") == path


def test_config_options_and_inspect_tool(make_config, tmp_path, capsys):
    assert make_config("checkpoint.resume=false").checkpoint.resume == "none"
    assert make_config("checkpoint.resume=auto").checkpoint.resume == "auto"
    ck = make_config("checkpoint=async").checkpoint
    assert (ck.async_save, ck.every_minutes, ck.every_steps) == (True, 30, 0)
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "inspect_checkpoint", Path(__file__).parents[2] / "tools" / "inspect_checkpoint.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    eng = make_engine(make_config(*TINY))
    path = _save(CheckpointManager(tmp_path / "run" / "checkpoints"), eng, 3).path
    assert tool.main([str(tmp_path / "run")]) == 0 and "1 complete checkpoint(s)" in capsys.readouterr().out
    assert tool.main([str(path)]) == 0 and "step: 3" in capsys.readouterr().out
    (path / "rng" / "rank_00000.pt").write_bytes(b"x")
    assert tool.main([str(path)]) == 2 and "rank_00000.pt: 1 bytes" in capsys.readouterr().err


def _schedule_body(rank: int, world_size: int) -> list[bool]:
    """Rank 0's clock says a save is due and rank 1's says not, then the other way round."""
    out = []
    for due_rank in (0, 1):
        sched = SaveSchedule(every_steps=0, every_minutes=1)
        if rank == due_rank:
            sched.last_save_time -= 120
        out.append(sched.due(7))
    return out


@pytest.mark.distributed
def test_time_based_saves_follow_rank_zero_on_every_rank():
    from tests.distributed import run_distributed

    assert run_distributed(_schedule_body, 2, timeout=120) == [[True, False], [True, False]]
