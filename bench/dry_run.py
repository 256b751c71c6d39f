"""Scale rehearsal: tools/dry_run.py on the issue's cases (Llama 8b, 70b and a 405B-shaped model at
64 to 2,048 ranks, Mixtral 8x7b with ep8 at 256, Llama 8b at 32k tokens with cp4 at 64), one process
per case, ranks 0 and the last. Steps are skipped where a step's
planned peak does not fit this machine or would take too long on its CPU (the tool says why), and
parameters go to meta where the shard itself does not fit: the set-up is then measured without
storage.

    .venv/bin/python bench/dry_run.py [--cases 8b@64,8b@256] [--steps 2]

Table on stdout, JSON in bench/results/dry_run.json; docs/benchmarks.md keeps the results.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import print_table, write_results  # noqa: E402

BF16 = [
    "trainer.precision=bf16",
    "parallel.param_dtype=bf16",
    "data.seq_len=8192",
    "trainer.micro_batch_size=1",
]
CASES = {
    "8b@64": (["model=8b", "parallel=zero3", "parallel.tp=8", "trainer.global_batch_size=8"], 64),
    "8b@256": (["model=8b", "parallel=zero3", "parallel.tp=8", "trainer.global_batch_size=32"], 256),
    "70b@512": (
        [
            "model=70b",
            "parallel=3d",
            "parallel.activation_checkpoint=full",
            "parallel.tp=8",
            "parallel.pp=8",
            "trainer.global_batch_size=64",
            "trainer.val_batches=8",
        ],
        512,
    ),
    "70b@1024": (
        [
            "model=70b",
            "parallel=3d",
            "parallel.activation_checkpoint=full",
            "parallel.tp=8",
            "parallel.pp=8",
            "trainer.global_batch_size=128",
            "trainer.val_batches=8",
        ],
        1024,
    ),
    "mixtral-ep8@256": (
        [
            "model=mixtral_8x7b",
            "parallel=zero3",
            "parallel.ep=8",
            "parallel.activation_checkpoint=full",
            "trainer.global_batch_size=256",
        ],
        256,
    ),
    "8b-32k-cp4@64": (
        [
            "model=8b_32k",
            "data.seq_len=32768",
            "parallel=zero3",
            "parallel.tp=8",
            "parallel.cp=4",
            "parallel.activation_checkpoint=full",
            "trainer.global_batch_size=2",
        ],
        64,
    ),
    "405b@2048": (
        [
            "model=405b",
            "parallel=3d",
            "parallel.activation_checkpoint=full",
            "parallel.tp=8",
            "parallel.pp=16",
            "parallel.pp_layers_per_stage=[7,8,8,8,8,8,8,8,8,8,8,8,8,8,8,7]",
            "trainer.global_batch_size=256",
            "trainer.val_batches=16",
        ],
        2048,
    ),
}
"""Layouts: 8b tp8 x fsdp; 70b tp8 x pp8 x fsdp (8 and 16); 405b tp8 x pp16 x fsdp16 (126 layers: 7 on
the two end stages, which also hold the embedding and the head, 8 on the others); 70b and 405b with
full activation checkpointing (without it 70b at 8k tokens needs ~85 GiB on the first stage)."""


SMALL = ["tracking=none"]  # + llmtrain.plan.dry_run.SMALL_MODEL
SMALL_CASES = {
    "ddp @64": (["parallel=ddp", "trainer.global_batch_size=128"], 64),
    "zero1 @64": (["parallel=zero1", "trainer.global_batch_size=128"], 64),
    "zero2 @64": (["parallel=zero2", "trainer.global_batch_size=128"], 64),
    "zero3 @64": (["parallel=zero3", "trainer.global_batch_size=128"], 64),
    "zero3 ac=full @64": (
        ["parallel=zero3", "parallel.activation_checkpoint=full", "trainer.global_batch_size=128"],
        64,
    ),
    "zero3 x tp2 @64": (["parallel=zero3", "parallel.tp=2", "trainer.global_batch_size=64"], 64),
    "hsdp 8x8 @64": (
        ["parallel=hsdp", "parallel.dp_replicate=8", "parallel.dp_shard=8", "trainer.global_batch_size=128"],
        64,
    ),
    "tp8 @8": (["parallel=tp2", "parallel.tp=8", "trainer.global_batch_size=2"], 8),
    "pp2 x zero3 dp4 @8": (
        ["parallel=3d", "parallel.tp=1", "parallel.pp=2", "trainer.global_batch_size=64"],
        8,
    ),
    "pp2 x tp2 x zero3 dp2 @8": (["parallel=3d", "trainer.global_batch_size=32"], 8),
}
"""A model small enough to step on this CPU: the measured memory and traffic vs the planner."""


def validate_small() -> list[dict]:
    """Rank 0 of each SMALL_CASES layout, stepped (2 steps, the second measured), in this process."""
    from llmtrain.plan.dry_run import SMALL_MODEL, DryRunOptions, dry_run_rank, measured_comm
    from llmtrain.testing import compose_config

    out = []
    for name, (overrides, world) in SMALL_CASES.items():
        r = dry_run_rank(compose_config(SMALL_MODEL + SMALL + overrides), world, 0, DryRunOptions())
        got, plan, sent = r.memory, r.planned_memory, measured_comm(r)
        row = {"case": name, "memory measured/planned": f"{got['total'] / plan['total']:.3f}"}
        row["MiB measured"] = f"{got['total'] / 2**20:.1f}"
        row["MiB planned"] = f"{plan['total'] / 2**20:.1f}"
        row["traffic measured/planned"] = ", ".join(
            f"{k} {sent.get(k, 0) / v:.3f}" for k, v in r.planned_comm.items()
        )
        out.append(row)
        print(row, flush=True)
    return out


def run_case(name: str, steps: int) -> dict:
    """One case through the real tool in a fresh process (its peak RSS is the case's)."""
    overrides, world = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        # the case's own overrides last: they may change BF16's sequence length
        cmd = [sys.executable, str(ROOT / "tools" / "dry_run.py"), *BF16, *overrides, "--world", str(world)]
        cmd += ["--steps", str(steps), "--json", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak_rss = _wait_peak_rss(proc)
        wall = time.perf_counter() - t0
        log = proc.stdout.read() if proc.stdout else ""
        if not out.exists():
            return {"case": name, "error": log[-2000:]}
        reports = json.loads(out.read_text())
    return {"case": name, "world": world, "wall_s": wall, "peak_rss": peak_rss, "ranks": reports, "log": log}


def _wait_peak_rss(proc: subprocess.Popen) -> int:
    """Poll the child's RSS until it exits (ru_maxrss would mix in earlier children)."""
    peak, ps = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    return peak


def rows(result: dict) -> list[dict]:
    mib, gib = 1024**2, 1024**3
    out = []
    for r in result.get("ranks", []):
        mem, plan = r["memory"], r["planned_memory"]
        out.append(
            {
                "case": result["case"],
                "rank": r["rank"],
                "layout": r["layout"].replace("dp_replicate=1 ", ""),
                "build s": f"{r['phases']['engine total']:.1f}",
                "init s": f"{r['phases'].get('materialize + init', 0.0):.1f}",
                "local params": f"{r['params_local'] / 1e6:.1f}M",
                "shard MiB": f"{mem['params'] / mib:.0f}",
                "build peak": f"{mem['build peak'] / max(mem['params'], 1):.2f}x",
                "RSS MiB": f"{result['peak_rss'] / mib:.0f}",
                "planned GiB": f"{plan['total'] / gib:.1f}",
                "measured GiB": f"{mem['total'] / gib:.1f}" if "total" in mem else "-",
                "ckpt items": r["checkpoint"]["items"],
                "verdict": r["verdict"].split(": ", 1)[1],
            }
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="only the small stepped layouts vs the planner")
    opts = ap.parse_args()
    if opts.small:
        table = validate_small()
        print_table(table, list(table[0]))
        write_results("dry_run_small", {"cases": table})
        return 0
    results = []
    for name in opts.cases.split(","):
        print(f"--- {name}", flush=True)
        res = run_case(name, opts.steps)
        results.append(res)
        if "error" in res:
            print(res["error"])
            continue
        notes = sorted({n for r in res["ranks"] for n in r["notes"]})
        print(f"wall {res['wall_s']:.0f}s; notes: {'; '.join(notes) or '-'}", flush=True)
    table = [row for res in results for row in rows(res)]
    cols = list(table[0]) if table else []
    print_table(table, cols)
    write_results("dry_run", {"cases": [{k: v for k, v in r.items() if k != "log"} for r in results]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
