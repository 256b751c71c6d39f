"""What a rank writes when the hang watchdog fires: every thread's Python stack (faulthandler) and, on
NCCL, torch's Flight Recorder trace of the last collectives, into <run_dir>/diagnostics/<time>/."""

import faulthandler
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

DIAGNOSTICS_DIR = "diagnostics"


def new_folder(run_dir: Path) -> Path:
    """<run_dir>/diagnostics/<UTC time>: one folder per hang, shared by every rank (the first rank to
    fire picks it, see llmtrain.resilience.watchdog)."""
    return run_dir / DIAGNOSTICS_DIR / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def dump_flight_recorder(folder: Path, rank: int) -> str:
    """NCCL Flight Recorder trace to nccl/nccl_trace_rank_<r> (NCCL groups only; gloo has none).
    Returns a line saying what was written or why nothing was."""
    backend = str(dist.get_backend()) if dist.is_initialized() else "none"
    if "nccl" not in backend:
        return f"NCCL Flight Recorder: skipped (backend {backend} has no Flight Recorder)"
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None:
        return "NCCL Flight Recorder: skipped (this torch build has no _dump_nccl_trace)"
    path = folder / "nccl" / f"nccl_trace_rank_{rank}"  # the names torch's fr_trace reader parses
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dump())
    except Exception as e:  # a wedged communicator may refuse; the stacks still matter
        return f"NCCL Flight Recorder: failed ({type(e).__name__}: {e})"
    return f"NCCL Flight Recorder trace: {path}"


def dump_rank(folder: Path, rank: int, header: str) -> Path:
    """rank<r>.txt: a header (who, where, why), the Flight Recorder note, then faulthandler's dump of
    every thread of this process. The main thread's stack names the call it is stuck in."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{rank}.txt"
    note = dump_flight_recorder(folder, rank)
    with open(path, "w") as f:
        f.write(f"rank {rank} host {socket.gethostname()} pid {os.getpid()}\n{header}\n{note}\n\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
    return path
