"""Warm ranks (llmtrain/launch/warm.py) as the SLURM node agent sees them: its signal forwarding must
reach the forks of the fork server, never the server or multiprocessing's resource tracker (a USR2,
whose default action is to terminate, would kill them and with the server every later restart)."""

import multiprocessing
import os
import time

from llmtrain.launch.slurm_agent import rank_pids


def test_signals_go_to_the_forks_of_the_warm_server_not_to_the_server() -> None:
    ctx = multiprocessing.get_context("forkserver")
    forks = [ctx.Process(target=time.sleep, args=(60,)) for _ in range(2)]
    for p in forks:
        p.start()
    try:
        pids = rank_pids()
        assert sorted(p.pid for p in forks) == sorted(x for x in pids if x in {p.pid for p in forks})
        servers = [c for c in _own_children() if b"forkserver" in _cmdline(c)]
        assert servers and not set(servers) & set(pids)
    finally:
        for p in forks:
            p.kill()
            p.join(10)


def _own_children() -> list[int]:
    from llmtrain.launch.slurm_agent import _children

    return _children(os.getpid())


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
