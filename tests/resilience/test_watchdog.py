"""Process-group timeouts from the config, the watchdog's deadline and heartbeats (docs/resilience.md).

The end-to-end hang (SIGSTOP, dumps, restart) is tests/resilience/test_hang.py; these are the parts
that need no job: the groups report the configured timeout, the deadline follows the measured step
times within its floor and ceiling, and a heartbeat that stops changing names its rank.
"""

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llmtrain.config import ConfigError
from llmtrain.config.resilience import ResilienceConfig
from llmtrain.parallel.dims import MESH_ORDER
from llmtrain.resilience.heartbeat import Heartbeats
from llmtrain.resilience.watchdog import HangWatchdog, StepClock, describe_ranks
from tests.distributed import free_port, run_distributed


def _groups_body(rank: int, world_size: int, timeout_s: float) -> dict[str, float]:
    """Re-create the default group through llmtrain's init, then every group a run builds."""
    import os

    from llmtrain.checkpoint import CheckpointManager
    from llmtrain.distributed.collectives import broadcast_object
    from llmtrain.distributed.env import DistEnv, group_timeout, init_distributed
    from llmtrain.parallel import ParallelDims

    port = broadcast_object(free_port())
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port)
    init_distributed(DistEnv(rank, rank, world_size, world_size), torch.device("cpu"), timeout_s)
    dims = ParallelDims(1, 2, 1, 1, world_size)
    mesh = dims.build_mesh("cpu")
    groups = {"default": None, "dp": dims.dp_mesh.get_group()}
    groups |= {name: mesh.get_group(name) for name in mesh.mesh_dim_names}
    manager = CheckpointManager(os.environ["CKPT_DIR"], async_save=True)  # its own background gloo group
    groups["checkpoint"] = manager._group
    return {name: group_timeout(g).total_seconds() for name, g in groups.items()}


@pytest.mark.distributed
def test_every_process_group_reports_the_configured_timeout(tmp_path):
    """torch gives a group made by new_group(timeout=None) (device-mesh dims, helper groups) 30 min
    whatever the default group got; resilience.pg_timeout_s must reach all of them."""
    results = run_distributed(_groups_body, 2, args=(45.0,), env={"CKPT_DIR": str(tmp_path)}, timeout=120)
    for got in results:
        assert set(got) == {"default", "dp", "checkpoint", *MESH_ORDER}
        assert got == dict.fromkeys(got, 45.0)


def test_deadline_uses_the_startup_allowance_then_the_median_within_floor_and_ceiling():
    cfg = ResilienceConfig(
        hang_factor=10, hang_min_s=3, hang_max_s=20, hang_startup_s=100, hang_warmup_steps=2
    )
    clock = StepClock(cfg)
    assert clock.step_deadline() == 100  # nothing timed yet
    clock.add(50.0)  # the first two steps compile and warm up: not timed
    clock.add(30.0)
    assert clock.step_deadline() == 100
    clock.add(0.1)
    assert clock.step_deadline() == 3  # 10 x 0.1 s = 1 s, raised to the floor
    for _ in range(20):
        clock.add(1.0)
    assert clock.step_deadline() == 10  # 10 x the median 1 s (the window forgets the 0.1 s)
    for _ in range(20):
        clock.add(5.0)
    assert clock.step_deadline() == 20  # capped at the ceiling
    assert "10 x median step 5.000s within [3, 20] s" in clock.describe()


def test_watchdog_deadline_between_steps_is_the_startup_allowance(tmp_path):
    cfg = ResilienceConfig(hang_min_s=1, hang_max_s=2, hang_startup_s=50, hang_warmup_steps=0)
    wd = HangWatchdog(cfg, 0, 1, tmp_path)  # one process: no store, thread not started
    assert wd.limit() == 50  # start-up: resume, engine build
    wd.step_started(0)
    wd.step_done()
    assert wd.limit() == 50  # saving or validating
    wd.step_started(1)
    assert wd.limit() == 1  # 10 x a tiny step, raised to the floor


def test_a_rank_whose_heartbeat_stops_is_named_stale():
    """Two ranks' heartbeat writers on one real TCPStore: rank 1 beats once and stops; rank 2 keeps
    beating, one step behind. Rank 0 names 1 stale (by its unchanged counter) and 2 as behind."""
    server = dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=timedelta(seconds=10))
    beats = [Heartbeats(server, r, 3) for r in range(3)]
    beats[0].beat(4, "step")
    beats[1].beat(4, "step")
    stop = threading.Event()

    def keep_beating() -> None:
        while not stop.is_set():
            beats[2].beat(3, "step")
            time.sleep(0.05)

    t = threading.Thread(target=keep_beating)
    t.start()
    try:
        stale, fresh = beats[0].stale_ranks(0.3)
    finally:
        stop.set()
        t.join()
    assert sorted(stale) == [1] and sorted(fresh) == [0, 2]
    text = describe_ranks(stale, fresh, 4)
    assert text.startswith("ranks that stopped reporting: 1 (last heartbeat at step 4 (step), host ")
    assert text.endswith("ranks still reporting but behind step 4: [2]")
    assert beats[1].request_dump("/a") == "/a" and beats[2].request_dump("/b") == "/a"  # first one wins
    assert beats[0].dump_requested() == "/a"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resilience.hang_max_s=700", "resilience.hang_max_s: must be below resilience.pg_timeout_s (600.0)"),
        ("resilience.hang_min_s=0", "resilience.hang_min_s: must be > 0 and <= resilience.hang_max_s"),
        ("resilience.inject_fault=[sigstop,hang]", "resilience.inject_fault"),
        ("resilience.crash_loop_after=0", "resilience.crash_loop_after: must be >= 1"),
    ],
)
def test_bad_hang_settings_name_the_key(make_config, override, message):
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        make_config(override)


STUCK = """
import sys, time
from pathlib import Path
from llmtrain.config.resilience import ResilienceConfig
from llmtrain.resilience.watchdog import HangWatchdog

cfg = ResilienceConfig(hang_min_s=0.5, hang_max_s=1, hang_startup_s=30, hang_warmup_steps=0, heartbeat_s=0.2)
wd = HangWatchdog(cfg, 0, 1, Path(sys.argv[1])).start()

def stuck_in_this_step():
    time.sleep(60)

wd.step_started(0)
wd.step_done()  # a 0 s step: the next deadline is the floor, 0.5 s
wd.step_started(1)
stuck_in_this_step()
"""


def test_one_process_watchdog_dumps_its_stuck_frame_and_exits_75(tmp_path):
    """No store with one process: the deadline still fires, the dump names the stuck function, the
    event is recorded and the exit code is the documented one."""
    import os
    import subprocess
    import sys

    from llmtrain.resilience import HANG_EXIT_CODE

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", STUCK, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == HANG_EXIT_CODE, out.stderr[-2000:]
    assert time.monotonic() - started < 30  # fired at its floor, not at the 60 s sleep's end
    (event,) = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert (event["kind"], event["step"], event["details"]["stale_ranks"]) == ("hang", 1, [])
    assert 0.5 <= event["details"]["waited_s"] <= 1.0
    (dump,) = (tmp_path / "diagnostics").glob("*/rank0.txt")
    assert "in stuck_in_this_step" in dump.read_text()
