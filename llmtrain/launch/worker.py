"""Per-rank entry point: `python -m llmtrain.launch.worker <resolved config.yaml>` under torchrun/srun.

Exits through os._exit after tearing the process group down: a gloo worker thread can abort the
interpreter during normal shutdown (docs/development.md), which would turn a good run into a failure.
"""

import logging
import os
import sys
import traceback

from llmtrain.config import load_config
from llmtrain.distributed.env import detect_env, shutdown_distributed


def setup_logging(rank: int, world_size: int) -> None:
    prefix = f"[rank{rank}] " if world_size > 1 else ""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S", force=True
    )
    if rank != 0:
        logging.getLogger("llmtrain").setLevel(logging.WARNING)


def input_errors() -> dict[type[Exception], str]:
    """Errors that mean bad input (config, checkpoint, data), by kind: reported as one line and exit
    code 2, not a traceback (the CLI and every rank treat them alike)."""
    from llmtrain.checkpoint.folder import CheckpointError
    from llmtrain.config import ConfigError
    from llmtrain.data.errors import DataError

    return {ConfigError: "config", CheckpointError: "checkpoint", DataError: "data"}


def run_training(config_path: str) -> dict:
    """Build the trainer for this rank from the resolved config and train."""
    from llmtrain.train.trainer import Trainer

    env = detect_env()
    setup_logging(env.rank, env.world_size)
    cfg = load_config(config_path)
    return Trainer(cfg, env).train()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    code = 0
    try:
        run_training(argv[0])
    except tuple(input_errors()) as e:  # bad input: one clear line per rank
        print(f"llmtrain [rank {os.environ.get('RANK', '0')}]: {type(e).__name__}: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        shutdown_distributed()
    except Exception:
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
