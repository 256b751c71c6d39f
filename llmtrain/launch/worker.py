"""Per-rank entry point: `python -m llmtrain.launch.worker <resolved config.yaml>` under torchrun/srun.

Exits through os._exit after tearing the process group down: a gloo worker thread can abort the
interpreter during normal shutdown (docs/development.md), which would turn a good run into a failure.

Exit codes: 0 finished, 2 bad input (config, checkpoint, data, run folder in use), 128+N stopped by
signal N (after saving at the step boundary), 1 anything else. Under the `llmtrain` launcher
(LLMTRAIN_ERROR_DIR set) a bad-input rank writes its message there instead of printing it, and the
launcher prints it once for all ranks.
"""

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from llmtrain.config import Config, load_config
from llmtrain.distributed.env import detect_env, shutdown_distributed
from llmtrain.train.signals import Interrupted, exit_code, interrupt_on_signals, watch_parent

ERROR_DIR_ENV = "LLMTRAIN_ERROR_DIR"


def setup_logging(rank: int, world_size: int) -> None:
    prefix = f"[rank{rank}] " if world_size > 1 else ""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S", force=True
    )
    if rank != 0:
        logging.getLogger("llmtrain").setLevel(logging.WARNING)


def input_errors() -> dict[type[Exception], str]:
    """Errors that mean bad input (config, checkpoint, data, a run folder in use), by kind: reported
    as one line and exit code 2, not a traceback (the CLI and every rank treat them alike)."""
    from llmtrain.checkpoint.folder import CheckpointError
    from llmtrain.config import ConfigError
    from llmtrain.data.errors import DataError
    from llmtrain.launch.lease import LeaseHeld

    return {ConfigError: "config", CheckpointError: "checkpoint", DataError: "data", LeaseHeld: "run folder"}


def train(cfg: Config) -> tuple[dict[str, Any], str | None]:
    """Build the trainer for this rank and train; returns the result and the stop signal (if any)."""
    from llmtrain.train.trainer import Trainer

    env = detect_env()
    setup_logging(env.rank, env.world_size)
    trainer = Trainer(cfg, env)
    result = trainer.train()
    return result, trainer.stop.signal_name if result["status"] == "KILLED" else None


def run_training(config_path: str) -> dict[str, Any]:
    """Train this rank from the resolved config file."""
    return train(load_config(config_path))[0]


def report_input_error(e: Exception, kind: str) -> None:
    """One line per job: to the launcher's error folder when there is one, else to stderr."""
    rank = os.environ.get("RANK", "0")
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"kind": kind, "message": str(e)}))
    else:
        print(f"llmtrain [rank {rank}]: {kind} error: {e}", file=sys.stderr)


def _run(cfg: Config | None, config_path: str) -> int:
    """Train and map the outcome to the exit code (see the module docstring)."""
    kinds = input_errors()
    try:
        with interrupt_on_signals():  # until the trainer's StopFlag takes the signals over
            _, stopped_by = train(cfg if cfg is not None else load_config(config_path))
        return exit_code(stopped_by) if stopped_by else 0
    except tuple(kinds) as e:  # bad input: one clear line
        report_input_error(e, next(k for cls, k in kinds.items() if isinstance(e, cls)))
        return 2
    except Interrupted as e:  # stopped during start-up: nothing to save yet
        if os.environ.get("RANK", "0") == "0" and not os.environ.get(ERROR_DIR_ENV):
            print(
                f"llmtrain: stopped by {e.signal_name} before training started; nothing saved",
                file=sys.stderr,
            )
        return exit_code(e.signal_name)
    except BaseException:
        if not _other_rank_failed():  # else this is the fallout (a collective with a rank gone)
            traceback.print_exc()
        return 1


def _other_rank_failed() -> bool:
    """Under the launcher: another rank already reported bad input (its line is the one to print)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    mine = f"rank{os.environ.get('RANK', '0')}.json"
    return bool(folder) and any(p.name != mine for p in Path(folder).glob("rank*.json"))


def run_rank(config_path: str, cfg: Config | None = None) -> int:
    """Train this rank to the end and tidy up; returns its exit code (see the module docstring)."""
    from llmtrain.launch.lease import release_held

    watch_parent()
    code = _run(cfg, config_path)
    if code == 0 or code > 128:  # all ranks end here together; after an error a peer may never come
        try:
            shutdown_distributed()
        except Exception:
            code = code or 1
    release_held()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None, cfg: Config | None = None) -> None:
    """Run this rank to the end and leave with its exit code (the process does not return)."""
    argv = sys.argv[1:] if argv is None else argv
    os._exit(run_rank(argv[0] if argv else "", cfg))


if __name__ == "__main__":
    main()
