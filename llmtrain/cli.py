"""`llmtrain` command: compose the Hydra config, validate it, and launch the run.

Validation happens here, in the launching process: a wrong key or value is reported with the allowed
values before any rank (or SLURM job) is started.
"""

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from llmtrain.config import ConfigError, register_configs, to_config
from llmtrain.config.schema import GROUP_SCHEMAS
from llmtrain.config.validate import check_override_keys

log = logging.getLogger("llmtrain")


def config_dir() -> str:
    """conf/ next to the package (editable install / source tree) or packaged inside it (wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"llmtrain config tree not found next to {here}")


def _sweep_run_name(base: str) -> str:
    """Sibling run names for multirun members: <name>-<swept key=value,...> (filesystem-safe).

    Only the swept keys go into the name (not every override), so names stay short and readable.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = HydraConfig.get()
    parser = OverridesParser.create()
    swept = {
        o.key_or_group
        for o in parser.parse_overrides([a for a in sys.argv[1:] if "=" in a])
        if o.is_sweep_override()
    }
    parts = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    suffix = ",".join(parts) or str(hc.job.num)
    return f"{base}-{re.sub(r'[^A-Za-z0-9_.=,-]+', '_', suffix)}"


def run(dcfg: DictConfig) -> int:
    """Task function: typed config -> launcher."""
    cfg = to_config(dcfg)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        base = cfg.run.name
        cfg.run.name = _sweep_run_name(base)
        # sibling MLflow runs under one parent per sweep (one sweep = one Hydra sweep folder)
        cfg.tracking.parent_run = (
            cfg.tracking.parent_run or f"{base}-sweep-{Path(HydraConfig.get().sweep.dir).name}"
        )
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:  # already a rank (user ran torchrun/srun)
        from llmtrain.launch.local import run_as_rank

        return run_as_rank(cfg)
    if cfg.launcher.name == "slurm":
        from llmtrain.launch.slurm import submit

        return submit(cfg)
    from llmtrain.launch.local import launch_local

    code = launch_local(cfg)
    if code != 0:
        raise SystemExit(code)
    return code


def main() -> None:
    register_configs()
    try:
        check_override_keys([a for a in sys.argv[1:] if not a.startswith("-")], GROUP_SCHEMAS)
    except ConfigError as e:
        print(f"llmtrain: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    app = hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(_task)
    app()
    slurm = sys.modules.get("llmtrain.launch.slurm")
    if slurm is not None:  # a multirun with launcher=slurm: its members go out as one job array
        slurm.flush_sweep()


def _task(dcfg: DictConfig) -> int:
    from llmtrain.launch.worker import input_errors
    from llmtrain.train.signals import Interrupted, exit_code

    kinds = input_errors()
    try:
        return run(dcfg)
    except tuple(kinds) as e:  # bad input: one clear line, no traceback
        kind = next(k for cls, k in kinds.items() if isinstance(e, cls))
        print(f"llmtrain: {kind} error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (KeyboardInterrupt, Interrupted) as e:  # a signal while composing or preparing
        name = getattr(e, "signal_name", "SIGINT")
        print(f"llmtrain: stopped by {name} before training started; nothing saved", file=sys.stderr)
        raise SystemExit(exit_code(name)) from None


if __name__ == "__main__":
    main()
