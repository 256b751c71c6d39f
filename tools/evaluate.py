"""Loss and perplexity of a checkpoint on held-out data, across ranks; logged to its MLflow run.

    python tools/evaluate.py runs/<name> --data ~/.cache/llmtrain/data/shakespeare-byte/val
    python tools/evaluate.py runs/sft --data heldout.jsonl       # prompt/response pairs, SFT-style
    torchrun --nproc-per-node 2 tools/evaluate.py runs/<name>/checkpoints/step_00001000 --data <arrow folder>

The checkpoint's model is rebuilt with the engine used for training (data parallel over the ranks
here) and scored on `--batches` micro-batches per rank, unshuffled from the start of the data (so the
same command gives the same number). A masked-LM checkpoint is scored on masked tokens, every other
objective on next-token cross-entropy. A .jsonl of prompt/response pairs (or chat messages, per the
run's objective.sft settings) is rendered and packed exactly as SFT training does and scored on the
response tokens only, each row once (whole steps of micro-batch x ranks; the JSON says how many rows
were left over). Rank 0 prints one JSON line and, when the run tracked to
MLflow, logs `eval/<name>/loss` and `eval/<name>/ppl` at the checkpoint's step into the same run.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.config import ConfigError
from llmtrain.distributed.env import detect_env, shutdown_distributed
from llmtrain.objectives.sft_data import SFTDataError


def log_to_mlflow(loaded, metrics: dict[str, float], name: str) -> str | None:
    """Add the metrics to the checkpoint's own MLflow run (no new run); returns the run id or None."""
    cfg, state = loaded.cfg, loaded.state
    run_id = state.mlflow_run_id
    if cfg.tracking.backend != "mlflow" or not run_id:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from llmtrain.tracking.mlflow_logger import default_uri

    root = Path(state.run_dir).parent if state.run_dir else cfg.run.root
    client = MlflowClient(cfg.tracking.uri or default_uri(root))
    ts, step = int(__import__("time").time() * 1000), state.step
    client.log_batch(run_id, metrics=[Metric(f"eval/{name}/{k}", v, ts, step) for k, v in metrics.items()])
    return run_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step_<N> folder, a run's checkpoints/ folder, or a run folder")
    ap.add_argument(
        "--data",
        required=True,
        help="held-out tokenized Arrow folder (with index.json), or a prompt/response (chat) .jsonl scored "
        "like SFT: packed as in training, loss on the response tokens only",
    )
    ap.add_argument("--batches", type=int, default=8, help="micro-batches per rank (default 8)")
    ap.add_argument(
        "--micro-batch-size", type=int, default=None, help="default: the run's trainer.micro_batch_size"
    )
    ap.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    ap.add_argument("--name", default="heldout", help="metric name: eval/<name>/loss (default heldout)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)

    from llmtrain.checkpoint import TrainerState, resolve_checkpoint_path
    from llmtrain.objectives.inference import evaluate_checkpoint, load_checkpoint_engine

    env = detect_env()
    try:
        cfg = TrainerState.read(resolve_checkpoint_path(args.checkpoint, key="checkpoint")).run_config()
        data = dataclasses.replace(cfg.data, seq_len=args.seq_len or cfg.data.seq_len)
        loaded = load_checkpoint_engine(args.checkpoint, env, device=args.device, data=data)
        metrics = evaluate_checkpoint(
            loaded,
            args.data,
            env=env,
            num_batches=args.batches,
            micro_batch_size=args.micro_batch_size or cfg.trainer.micro_batch_size,
        )
    except (ConfigError, FileNotFoundError, SFTDataError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if env.is_main:
        run_id = (
            None
            if args.no_log
            else log_to_mlflow(loaded, {"loss": metrics["loss"], "ppl": metrics["ppl"]}, args.name)
        )
        print(
            json.dumps(
                {
                    "checkpoint": str(loaded.path),
                    "step": loaded.state.step,
                    "data": args.data,
                    **metrics,
                    "mlflow_run_id": run_id,
                }
            )
        )
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
