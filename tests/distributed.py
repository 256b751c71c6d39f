"""Spawn N real torch.distributed ranks (gloo on CPU) for a test function (docs/development.md).

    def _body(rank: int, world_size: int, x: int) -> dict: ...   # module-level, picklable
    results = run_distributed(_body, world_size=2, args=(3,))      # [result of rank 0, rank 1]

Each rank gets a fresh process (spawn), a process group on a free loopback port, one torch thread, and
log lines prefixed with its rank. A test is judged by what the ranks *report* through the result
queue, not by exit codes: gloo can abort a process during interpreter shutdown (docs/development.md),
so every rank tears its group down and leaves with os._exit. A hard timeout kills stragglers.
"""

import multiprocessing as mp
import os
import queue
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RankPrefix:
    def __init__(self, stream: Any, rank: int) -> None:
        self.stream, self.prefix, self.bol = stream, f"[rank{rank}] ", True

    def write(self, text: str) -> int:
        out = []
        for line in text.splitlines(keepends=True):
            out.append((self.prefix if self.bol else "") + line)
            self.bol = line.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _worker(
    fn: Callable,
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    args: tuple,
    env: dict[str, str],
    results: Any,
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    sys.stdout, sys.stderr = _RankPrefix(sys.stdout, rank), _RankPrefix(sys.stderr, rank)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException as e:
        results.put((rank, "error", "".join(traceback.format_exception(e))))
        code = 1
    try:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit skips the queue's feeder thread: wait until the result is really sent (a fast teardown,
    # e.g. after DeepSpeed replaced the comm backend, otherwise loses it: "exited without reporting").
    results.close()
    results.join_thread()
    os._exit(code)


def run_distributed(
    fn: Callable,
    world_size: int = 2,
    args: tuple = (),
    backend: str = "gloo",
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run fn(rank, world_size, *args) on world_size ranks; return the per-rank results in rank order.

    Raises AssertionError with every failing rank's traceback, or on timeout.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(fn, r, world_size, port, backend, args, env or {}, results), daemon=False
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, Any]] = {}
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"distributed test timed out after {timeout}s; ranks reported: {sorted(got)}"
                )
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
                got[rank] = (status, payload)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    missing = sorted(set(range(world_size)) - set(got))
                    codes = {r: procs[r].exitcode for r in missing}
                    raise AssertionError(
                        f"ranks {missing} exited without reporting (exit codes {codes})"
                    ) from None
                if any(s == "error" for s, _ in got.values()):
                    break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: msg for r, (s, msg) in got.items() if s == "error"}
    if errors:
        raise AssertionError(
            "\n".join(f"--- rank {r} failed ---\n{msg}" for r, msg in sorted(errors.items()))
        )
    return [got[r][1] for r in range(world_size)]
