"""Rehearse an N-rank job on this CPU: build rank r with the real engine on torch's fake process
group, run real steps on its shard, and compare memory and traffic with the planner.

    python tools/dry_run.py model=8b parallel=zero3 parallel.tp=8 --world 256 [--ranks 0,255] \
        [--steps 2] [--gpu-memory-gb 80] [--max-step-tflop 2] [--meta] [--json out.json]

Arguments with `=` are Hydra overrides of the training config (as for `llmtrain ...`). Default ranks:
0 and the last. Prints per rank a table (set-up phases, memory by category next to
llmtrain/plan/memory.py, collectives per step next to llmtrain/plan/comm.py, the DCP save plan) and a
one-line verdict; exit status 1 when a rank does not fit --gpu-memory-gb. docs/dry_run.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, required=True, help="ranks of the rehearsed job")
    ap.add_argument("--ranks", default=None, help="comma-separated ranks to build (default: 0 and the last)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps (the last is measured; 0: none)")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU (GiB) for the verdict")
    ap.add_argument("--max-step-tflop", type=float, default=2.0, help="skip steps heavier than this per rank")
    ap.add_argument("--meta", action="store_true", help="parameters on meta: set-up and shapes only")
    ap.add_argument("--json", type=Path, default=None, help="write the reports as JSON ('-': stdout)")
    opts, rest = ap.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like key=value)")
    return opts, rest


def main(argv: list[str] | None = None) -> int:
    opts, overrides = parse(sys.argv[1:] if argv is None else argv)
    import logging
    import warnings

    from llmtrain.config.errors import ConfigError
    from llmtrain.testing import compose_config

    warnings.filterwarnings("ignore")  # fake-group and DTensor warnings repeat per rank
    logging.getLogger("llmtrain").setLevel(logging.ERROR)

    try:
        cfg = compose_config([*overrides, "tracking=none"])
        return _run(cfg, opts)
    except ConfigError as e:
        print(f"dry_run: config error: {e}", file=sys.stderr)
        return 2


def _run(cfg: object, opts: argparse.Namespace) -> int:
    """Dry-run the requested ranks, print their tables, write JSON; 1 when a rank does not fit."""
    from llmtrain.plan.dry_run import DryRunOptions, dry_run_rank, format_report

    ranks = sorted({0, opts.world - 1}) if opts.ranks is None else [int(r) for r in opts.ranks.split(",")]
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    run = DryRunOptions(
        steps=opts.steps,
        max_step_tflop=opts.max_step_tflop,
        meta=True if opts.meta else None,
        gpu_memory_gb=opts.gpu_memory_gb,
        progress=progress,
    )
    reports = [dry_run_rank(cfg, opts.world, r, run) for r in ranks]
    out = sys.stdout if opts.json != Path("-") else sys.stderr
    for r in reports:
        print(format_report(r), file=out)
    if opts.json is not None:
        text = json.dumps([r.as_dict() for r in reports], indent=2)
        print(text) if opts.json == Path("-") else opts.json.write_text(text)
    return 0 if all("does NOT fit" not in r.verdict for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
