"""Run every benchmark (one command), each in its own process; results land in bench/results/.

    python bench/run_all.py            # CPU benches; the GPU bench too when CUDA is available
    python bench/run_all.py --quick    # fewer rounds/points, results as *_quick.json (not for docs)

The GPU bench is skipped without CUDA (its --smoke self-check runs instead, so a broken script
shows up here rather than on the next GPU machine).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def benches(quick: bool) -> list[list[str]]:
    overhead = ["--rounds", "2", "--steps-per-round", "2", "--dim", "128"] if quick else []
    quick_plot = str(HERE / "results" / "scaling_cpu_quick.png")  # keep docs/scaling_cpu.png from full runs
    scaling = (
        ["--steps", "1", "--dims", "64", "128", "--seqs", "128", "256", "--plot", quick_plot] if quick else []
    )
    gpu = ["--steps", "3"] if quick else []
    gpu = gpu if torch.cuda.is_available() else ["--smoke"]
    return [["overhead.py", *overhead], ["scaling.py", *scaling], ["gpu_throughput.py", *gpu]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    opts = ap.parse_args()
    failed = []
    env = {**os.environ, "LLMTRAIN_BENCH_SUFFIX": "_quick"} if opts.quick else None
    for script, *args in benches(opts.quick):
        print(f"\n=== {script} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / script), *args], env=env)
        print(f"=== {script}: exit {rc} after {time.perf_counter() - t0:.0f}s", flush=True)
        if rc:
            failed.append(script)
    print(f"\nresults in {HERE / 'results'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
