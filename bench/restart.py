"""Restart cost: kill one rank of a real 2-rank run, restart it with resume, and split the time from the
kill to the first step after the restart; beside it, the checkpoint load against the disk.

    .venv/bin/python bench/restart.py [--dim 512] [--layers 4] [--vocab 16000] [--repeats 3]

1. `llmtrain launcher.nproc=2` (torchrun's agent, DDP on gloo) trains a small decoder whose fp32
   weights and AdamW moments make a ~390 MB checkpoint, saved every 3 steps.
2. After the step-3 checkpoint and one more step, rank 1 gets SIGKILL. detection: kill -> the
   launcher has exited (the agent notices the dead rank and ends the other one).
3. The checkpoint's pages are dropped (a cold load, as on a fresh node), the same command is run again
   (auto-resume). Its rank 0 writes the marks of llmtrain/resilience/timeline.py to starts.jsonl:
   process start (launch -> the trainer reaches the rendezvous: interpreter, imports, config, torchrun
   agent), rendezvous, build (model, optimizer, loaders), checkpoint load, data-loader seek, first step.
4. The same kill with `resilience.max_restarts=1`: the launcher stays and forks the new ranks from its
   warm server (launch/warm.py); the same phases, detection ending at the launcher's restart decision.
5. Same process, same checkpoint: `--repeats` rounds of a cold sequential read of the checkpoint's
   own files (the same bytes, 64 MB reads: the disk's rate), a cold load through torch's stock DCP reader and a cold load
   through llmtrain's in-place reader (checkpoint/inplace.py), both into the live state dict of a
   one-process engine of the same model (what NativeEngine.load does). Medians and ratios.
Prints tables, writes bench/results/restart.json.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.checkpoint_io import drop_cache, tree_bytes  # noqa: E402
from bench.common import print_table, write_results  # noqa: E402
from llmtrain.launch.slurm_agent import rank_pids  # noqa: E402

PHASES = ["detection", "process_start", "rendezvous", "build", "checkpoint_load", "loader_seek", "first_step"]


def overrides(a: argparse.Namespace, data: Path, root: Path) -> list[str]:
    return [
        f"model.dim={a.dim}",
        f"model.n_layers={a.layers}",
        "model.n_heads=8",
        "model.n_kv_heads=4",
        f"model.vocab_size={a.vocab}",
        f"model.ffn_dim={4 * a.dim}",
        "data.seq_len=32",
        f"data.sources.0.path={data}",
        "trainer.micro_batch_size=1",
        "trainer.global_batch_size=2",
        "trainer.val_every=0",
        "trainer.log_every=1",
        "tracking=none",
        "checkpoint.enabled=true",
        "checkpoint.every_steps=3",
        "checkpoint.save_at_end=false",
        "launcher.nproc=2",
        f"run.root={root}",
        "run.name=restart",
    ]


def cli(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "llmtrain.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None or time.time() - t0 > timeout:
            raise RuntimeError(f"{what}: the run ended or timed out (rc {proc.poll()})")
        time.sleep(0.05)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "torch.distributed.run" not in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    raise RuntimeError(f"no process with RANK={rank} under the launcher")


def kill_and_restart(a: argparse.Namespace, data: Path, root: Path) -> dict[str, float]:
    """Steps 1-3 of the module docstring: the phase durations in seconds."""
    run_dir, args = root / "restart", overrides(a, data, root)
    log = root / "first.log"
    first = cli([*args, "trainer.max_steps=1000"], log)
    train_log = run_dir / "train_log.jsonl"
    wait_for(
        lambda: (run_dir / "checkpoints" / "step_00000003" / "COMPLETE").exists(), first, "first checkpoint"
    )
    wait_for(lambda: train_log.is_file() and len(train_log.read_text().splitlines()) >= 4, first, "step 4")
    victim = rank_process(first, 1)
    t_kill = time.time()
    victim.send_signal(signal.SIGKILL)
    first.wait(timeout=300)
    t_exit = time.time()
    drop_cache(run_dir / "checkpoints")
    t_launch = time.time()
    second = cli([*args, "trainer.max_steps=5"], root / "second.log")
    if second.wait(timeout=900) != 0:
        raise RuntimeError(f"restart failed: {(root / 'second.log').read_text()[-3000:]}")
    m = json.loads((run_dir / "starts.jsonl").read_text().splitlines()[-1])
    assert m["step"] == 3, m
    gb = tree_bytes(run_dir / "checkpoints" / "step_00000003" / "model_optim") / 1e9
    return _phases(m, t_kill, t_exit, t_launch) | {"checkpoint_gb": gb}


def in_job_restart(a: argparse.Namespace, data: Path, root: Path) -> dict[str, float]:
    """The same kill with resilience.max_restarts=1: the launcher stays, the ranks are forked again
    from its warm server. detection: kill -> the launcher's restart decision (events.jsonl);
    process start: the decision -> the new rank 0 reaches the rendezvous (agent, fork, config)."""
    run_dir, args = root / "in_job", [*overrides(a, data, root), "run.name=in_job"]
    proc = cli([*args, "trainer.max_steps=5", "resilience.max_restarts=1"], root / "in_job.log")
    train_log = run_dir / "train_log.jsonl"
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000003" / "COMPLETE").exists(), proc, "checkpoint")
    wait_for(lambda: train_log.is_file() and len(train_log.read_text().splitlines()) >= 4, proc, "step 4")
    victim = psutil.Process(rank_pids(proc.pid)[0])  # a fork of the launcher's warm server
    t_kill = time.time()
    victim.send_signal(signal.SIGKILL)
    drop_cache(run_dir / "checkpoints")
    if proc.wait(timeout=900) != 0:
        raise RuntimeError(f"in-job restart failed: {(root / 'in_job.log').read_text()[-3000:]}")
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    t_restart = next(e["time"] for e in events if e["kind"] == "restart")
    m = json.loads((run_dir / "starts.jsonl").read_text().splitlines()[-1])
    assert m["step"] == 3, m
    return _phases(m, t_kill, t_restart, t_restart) | {"checkpoint_gb": 0.0}


def _phases(m: dict, t_kill: float, t_exit: float, t_launch: float) -> dict[str, float]:
    """Phase durations from a start's marks (resilience/timeline.py) and the bench's own clocks."""
    return {
        "detection": t_exit - t_kill,
        "process_start": m["rendezvous_start"] - t_launch,
        "rendezvous": m["rendezvous_done"] - m["rendezvous_start"],
        "build": m["load_start"] - m["rendezvous_done"],
        "checkpoint_load": m["load_done"] - m["load_start"],
        "loader_seek": m["seek_done"] - m["load_done"],
        "first_step": m["first_step"] - m["seek_done"],
        "total": m["first_step"] - t_kill,
    }


def sequential_read(folder: Path, chunk: int = 64 << 20) -> float:
    """Seconds for a cold read of every file of `folder`, each front to back in `chunk` reads."""
    drop_cache(folder)
    buf = bytearray(chunk)
    t0 = time.perf_counter()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def load_rates(a: argparse.Namespace, data: Path, root: Path) -> dict[str, float]:
    """Step 4: plain read vs stock DCP load vs in-place load, cold, medians over --repeats."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from llmtrain.checkpoint.dcp_io import single_process_dcp
    from llmtrain.checkpoint.inplace import load_in_place
    from llmtrain.optim import init_optimizer_state
    from llmtrain.parallel import ParallelDims
    from llmtrain.parallel.build import build_engine
    from llmtrain.parallel.native import SD_OPTIONS
    from llmtrain.testing import compose_config

    folder = root / "restart" / "checkpoints" / "step_00000003" / "model_optim"
    args = [x for x in overrides(a, data, root) if not x.startswith("launcher.")]
    engine = build_engine(compose_config(args), ParallelDims(1, 1, 1, 1, 1), None, torch.device("cpu"))
    init_optimizer_state(engine.optimizer)
    msd, osd = get_state_dict(engine.model, engine.optimizer, options=SD_OPTIONS)
    state = {"model": msd, "optim": osd}
    nbytes = tree_bytes(folder)
    times: dict[str, list[float]] = {"plain": [], "stock": [], "in_place": []}
    for _ in range(a.repeats):
        times["plain"].append(sequential_read(folder))
        for name, load in (
            ("stock", lambda: dcp.load(state, checkpoint_id=str(folder), no_dist=True)),
            ("in_place", lambda: load_in_place(state, folder, no_dist=True)),
        ):
            drop_cache(folder)
            t0 = time.perf_counter()
            with single_process_dcp():
                load()
            times[name].append(time.perf_counter() - t0)
    gb = nbytes / 1e9
    out = {f"{k}_gbps": gb / statistics.median(v) for k, v in times.items()}
    out |= {"stock_vs_disk": out["stock_gbps"] / out["plain_gbps"]}
    out |= {"in_place_vs_disk": out["in_place_gbps"] / out["plain_gbps"], "gb": gb}
    out["rounds"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / "runs" / "bench_restart"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    from llmtrain.data.prepare import prepare_dataset

    Path(a.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp)
        data = root / "data"
        prepare_dataset("builtin:shakespeare", data, "byte", shard_tokens=1 << 20, val_fraction=0.05)
        phases = kill_and_restart(a, data, root)
        in_job = in_job_restart(a, data, root)
        rates = load_rates(a, data, root)
    rows = [
        {"phase": p, "relaunch s": phases[p], "share": phases[p] / phases["total"], "in-job s": in_job[p],
         "in-job share": in_job[p] / in_job["total"]}
        for p in [*PHASES, "total"]
    ]  # fmt: skip
    rows[-1]["phase"] = "total (kill -> first step)"
    table = print_table(rows, ["phase", "relaunch s", "share", "in-job s", "in-job share"])
    print(f"in-job restart / relaunch: {in_job['total'] / phases['total']:.2f}x")
    load_gbps = phases["checkpoint_gb"] / phases["checkpoint_load"]
    print(f"checkpoint {phases['checkpoint_gb']:.3f} GB, restart load {load_gbps:.3f} GB/s")
    rate_rows = [
        {"read": "the same files, sequential", "GB/s": rates["plain_gbps"], "vs_disk": 1.0},
        {"read": "DCP load, torch's reader", "GB/s": rates["stock_gbps"], "vs_disk": rates["stock_vs_disk"]},
        {"read": "DCP load, in place", "GB/s": rates["in_place_gbps"], "vs_disk": rates["in_place_vs_disk"]},
    ]
    table2 = print_table(rate_rows, ["read", "GB/s", "vs_disk"])
    write_results(
        "restart",
        {
            "args": vars(a),
            "phases": phases,
            "in_job": in_job,
            "rates": rates,
            "table": table,
            "rates_table": table2,
        },
    )


if __name__ == "__main__":
    main()
