#!/usr/bin/env python
"""Render the loss and throughput curves of one or more MLflow runs to a PNG.

    python tools/plot_runs.py my-run                                 # run name or id, default store
    python tools/plot_runs.py sweep-lr=1e-3 sweep-lr=3e-3 -o lr.png --uri http://mlflow:5000
    python tools/plot_runs.py my-run --metrics train/loss,val/loss,perf/mfu

Panels: training loss with validation loss dashed on the same axes, then tokens/s; `--metrics` picks
others. A run is named by id or by run name (newest run of that name in the experiment). When a step
has several points (other tools can log twice; llmtrain itself never does, see docs/tracking.md) the
latest point of that step is drawn.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.tracking.mlflow_logger import default_uri

DEFAULT_PANELS = [["train/loss", "val/loss"], ["perf/tokens_per_s"]]


def latest_per_step(history: list[Any]) -> tuple[list[int], list[float]]:
    """(steps, values) sorted by step, keeping the newest point of each step."""
    best: dict[int, tuple[int, float]] = {}
    for m in history:
        if m.step not in best or m.timestamp >= best[m.step][0]:
            best[m.step] = (m.timestamp, m.value)
    steps = sorted(best)
    return steps, [best[s][1] for s in steps]


def resolve_run(client: Any, ref: str, experiment: str) -> Any:
    """A run by id, else the newest run with that name in `experiment`."""
    try:
        return client.get_run(ref)
    except Exception:
        pass
    exp = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`mlflow.runName` = '{ref}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if exp
        else []
    )
    if not runs:
        raise SystemExit(f"plot_runs: no run with id or name {ref!r} in experiment {experiment!r}")
    return runs[0]


def collect(client: Any, runs: list[Any], panels: list[list[str]]) -> dict[str, dict[str, tuple]]:
    """{run label: {metric: (steps, values)}} for every metric of every panel the run has."""
    data: dict[str, dict[str, tuple]] = {}
    for run in runs:
        label = run.data.tags.get("mlflow.runName", run.info.run_id[:8])
        series = {}
        for key in {k for panel in panels for k in panel}:
            hist = client.get_metric_history(run.info.run_id, key)
            if hist:
                series[key] = latest_per_step(hist)
        data[label] = series
    return data


def render(data: dict[str, dict[str, tuple]], panels: list[list[str]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[:, 0], panels):
        for i, (label, series) in enumerate(data.items()):
            for j, key in enumerate(panel):
                if key in series:
                    steps, values = series[key]
                    style = "-" if j == 0 else "--"
                    marker = "o" if len(steps) < 30 else None
                    ax.plot(
                        steps,
                        values,
                        style,
                        color=colors[i % len(colors)],
                        marker=marker,
                        ms=3,
                        label=f"{label} {key}",
                    )
        ax.set_ylabel(" / ".join(panel))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(", ".join(data) if len(data) <= 3 else f"{len(data)} runs")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run ids or run names")
    p.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    p.add_argument("--runs-root", default="runs", help="runs folder holding the default store")
    p.add_argument("--experiment", default="llmtrain", help="experiment searched for run names")
    p.add_argument("--metrics", help="comma-separated metrics, one panel each (default: loss, tokens/s)")
    p.add_argument("-o", "--out", type=Path, default=Path("runs.png"), help="PNG file to write")
    args = p.parse_args(argv)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=args.uri or default_uri(args.runs_root))
    panels = [[m] for m in args.metrics.split(",")] if args.metrics else DEFAULT_PANELS
    runs = [resolve_run(client, ref, args.experiment) for ref in args.runs]
    data = collect(client, runs, panels)
    if not any(data.values()):
        raise SystemExit(f"plot_runs: the runs have none of the metrics {panels}")
    print(f"wrote {render(data, panels, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
