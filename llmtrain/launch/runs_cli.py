"""`python tools/runs.py` (or `python -m llmtrain.launch.runs_cli`): list, inspect and cancel runs.

    runs.py list   [--root runs] [--sweep ID]    runs submitted to SLURM, with job state and progress
    runs.py status RUN [--root runs] [--json]    last job, last checkpoint, step, loss, MLflow link
    runs.py cancel RUN... | --sweep ID           scancel the live jobs of runs (ranks save at SIGTERM)

RUN is a run folder or a run name under --root.
"""

import argparse
import json
import sys
from pathlib import Path

from llmtrain.launch.runs import cancel_run, find_runs, job_states, run_status
from llmtrain.tracking.commands import tail_command


def _run_dir(run: str, root: str) -> Path:
    path = Path(run)
    if path.is_dir():
        return path
    if (Path(root) / run).is_dir():
        return Path(root) / run
    raise SystemExit(f"runs: no run folder {run!r} (looked at ./{run} and {Path(root) / run})")


def _progress(st: dict) -> str:
    step = "-" if st["step"] is None else str(st["step"])
    return f"{step}/{st['max_steps']}" if st["max_steps"] else step


def cmd_list(args: argparse.Namespace) -> int:
    runs = find_runs(Path(args.root), args.sweep)
    if not runs:
        where = f"sweep {args.sweep!r}" if args.sweep else "SLURM runs"
        print(f"no {where} under {args.root}")
        return 1
    rows = [run_status(r, with_mlflow=False) for r in runs]
    states = job_states([r["job_id"] for r in rows if r["job_id"]])
    header = ("RUN", "JOB", "STATE", "STEP", "CKPT", "LOSS")
    table = [header] + [
        (
            r["run"],
            r["job_id"] or "-",
            states.get(r["job_id"], "-"),
            _progress(r),
            "-" if r["checkpoint_step"] is None else str(r["checkpoint_step"]),
            "-" if r["loss"] is None else f"{r['loss']:.4f}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = run_status(_run_dir(args.run, args.root))
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    loss = "-" if st["loss"] is None else f"{st['loss']:.4f}"
    print(f"run        {st['run']}  ({st['run_dir']})")
    print(f"job        {st['job_id'] or '-'}  {st['state'] or ''}  sweep={st['sweep'] or '-'}")
    print(f"progress   step {_progress(st)}  loss {loss}")
    print(f"checkpoint {st['checkpoint'] or '-'}")
    print(f"mlflow     {st['mlflow'] or '-'}")
    print(f"log        {st['log'] or '-'}")
    if st["stdout"]:
        print(f"stdout     {st['stdout']}")
    if st["log"]:
        print(f"follow     {tail_command(st['log'])}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    if not args.runs and not args.sweep:
        raise SystemExit("runs cancel: name runs or give --sweep ID")
    dirs = [_run_dir(r, args.root) for r in args.runs] + (
        find_runs(Path(args.root), args.sweep) if args.sweep else []
    )
    for d in dirs:
        ids = cancel_run(d)
        print(f"{d.name}: {'cancelled ' + ', '.join(ids) if ids else 'no live job'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="runs.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="runs with their SLURM state")
    ls.add_argument("--root", default="runs")
    ls.add_argument("--sweep", help="only members of this sweep (id printed at submission)")
    ls.set_defaults(fn=cmd_list)
    st = sub.add_parser("status", help="where one run stands")
    st.add_argument("run")
    st.add_argument("--root", default="runs")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)
    cc = sub.add_parser("cancel", help="scancel runs")
    cc.add_argument("runs", nargs="*")
    cc.add_argument("--root", default="runs")
    cc.add_argument("--sweep")
    cc.set_defaults(fn=cmd_cancel)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
