"""Warm ranks for in-job restarts: rank processes forked from a server that imported torch and the
trainer once, instead of fresh interpreters that import them again at every start.

Process start (interpreter, `import torch`, the trainer's imports: torch.distributed.checkpoint pulls
in DTensor, torch.fx and sympy) was the largest part of a restart (bench/restart.py: 57-65% of kill ->
first step). With `resilience.max_restarts > 0` the launcher (launch/local.py, and the SLURM node agent)
starts the ranks through torch's elastic agent with a Python entry point and the `forkserver` start
method: multiprocessing's fork server imports `PRELOAD` once, the first time ranks start, and every
rank of every attempt is a fork of it. Forking is safe there: the server only imported modules (no
threads, no CUDA, no process group); each fork then initialises its own.

What stays as in a fresh process: the rank's environment is the launcher's at this attempt (written to
a file, `LLMTRAIN_ATTEMPT` and the error folder change per attempt) plus what the elastic agent sets
for the rank; exit codes reach the agent as before (`os._exit` for every code but 0, which returns so
the agent gets its return value; FALLOUT_S says which failure the agent names); the rank's parent is
the fork server, which exits when the launcher dies (`_release_server`), so the rank still gets its
parent-death SIGTERM (signals.watch_parent).
"""

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

PRELOAD = ["torch", "llmtrain.launch.worker", "llmtrain.train.trainer"]
"""Imported once by the fork server (an ImportError there is skipped; the rank then imports it)."""
ELASTIC_KEYS = {
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_NAME",
    "LOCAL_WORLD_SIZE",
    "WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CUDA_VISIBLE_DEVICES",
}
"""What torch's elastic agent sets per rank (LocalElasticAgent._start_workers), besides TORCHELASTIC_*
and TORCH_NCCL_*."""
FALLOUT_S = 1.0
"""A forked rank that fails with exit code 1 waits this long before it exits. Torch's agent reports
only the first forked rank to end (subprocess ranks: all of them), and when a rank dies its peers fail
in their next collective within milliseconds: the wait lets the cause (a rank killed by a signal ends
at once, a rank that raised has started its wait first) be the one reported, not its fallout."""
EXIT_GRACE_S = 60.0
"""A rank that returned but has not exited after this (a non-daemon thread holding the interpreter
open) is ended with its code 0 anyway: nothing of the run is left to do by then."""


def warm_entry(launch_cfg: Any, scratch: Path, config_path: Path) -> tuple[Any, tuple[str, ...]]:
    """Switch `launch_cfg` (torch's LaunchConfig) to forked ranks; the (entry point, args) to launch."""
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)  # no-op once running
    launch_cfg.start_method = "forkserver"
    env_file = scratch / "environ.json"
    env_file.write_text(json.dumps(dict(os.environ)))
    return forked_rank, (str(config_path), str(env_file))


def _release_server() -> None:
    """Close this fork's copy of the fork server's keep-alive pipe. multiprocessing hands it to every
    fork (so that the fork could start processes of its own); held by the ranks, it kept the server
    alive after a SIGKILLed launcher, so the ranks never got their parent-death signal."""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # type: ignore[attr-defined]
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


def _elastic(key: str) -> bool:
    return key in ELASTIC_KEYS or key.startswith(("TORCHELASTIC_", "TORCH_NCCL_"))


def forked_rank(config_path: str, env_file: str) -> None:
    """A rank's entry point in a fork: the attempt's environment, then the worker's own path."""
    from llmtrain.launch.worker import run_rank

    _release_server()
    mine = {k: v for k, v in os.environ.items() if _elastic(k)}
    os.environ.clear()
    os.environ.update(json.loads(Path(env_file).read_text()))
    os.environ.update(mine)
    code = run_rank(config_path)
    if code == 1:
        time.sleep(FALLOUT_S)
    if code != 0:
        os._exit(code)
    timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
