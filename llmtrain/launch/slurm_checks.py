"""Checks run on the login node before a SLURM job is submitted.

A job that waits six hours in the queue and then dies on a bad setting costs a day, so everything
that can be known before `sbatch` is checked here: static rules on the config (time limit vs the
pre-timeout signal and the checkpoint interval, layout vs number of tasks) and rules that need the
cluster (partition exists or a default exists, GPUs and CPUs per node), read from `sinfo`.
"""

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass

from llmtrain.config import Config, ConfigError

log = logging.getLogger("llmtrain")

MIN_TRAINING_SHARE = 0.5
"""Warn when less than this share of an allocation is left for training steps."""
STARTUP_S_CPU = 30
"""Estimated start-up of one allocation on CPU nodes (srun, interpreter and imports, process group,
model build, data open, checkpoint load of a small model): 20-23 s measured on the local test cluster
with the tiny model (a 60 s allocation with a 30 s signal delay trained 7-10 s), rounded up."""
STARTUP_S_GPU = 90
"""The same on GPU nodes (CUDA context and NCCL set-up on top; an estimate: large checkpoints add to it)."""


def tasks_per_node(cfg: Config) -> int:
    """One task per GPU on GPU clusters; launcher.nproc CPU ranks per node otherwise."""
    lc = cfg.launcher
    return lc.gpus_per_node if lc.gpus_per_node > 0 else lc.nproc


def world_size(cfg: Config) -> int:
    return cfg.launcher.nodes * tasks_per_node(cfg)


def check_static(cfg: Config) -> None:
    """Rules that need no cluster: raise ConfigError naming the key and the allowed range."""
    lc, ck = cfg.launcher, cfg.checkpoint
    for key in ("nodes", "nproc", "cpus_per_task", "time_min", "rdzv_timeout_s"):
        if getattr(lc, key) < 1:
            raise ConfigError(f"launcher.{key}={getattr(lc, key)} must be >= 1")
    if lc.gpus_per_node < 0 or lc.max_requeues < 0 or lc.signal_delay_s < 0:
        raise ConfigError(
            "launcher.gpus_per_node, launcher.max_requeues and launcher.signal_delay_s must be >= 0"
        )
    if lc.gpus_per_node > 0 and lc.nproc not in (1, lc.gpus_per_node):
        raise ConfigError(
            f"launcher.nproc={lc.nproc} conflicts with launcher.gpus_per_node={lc.gpus_per_node}: on GPU "
            "nodes SLURM starts one task per GPU; leave launcher.nproc at 1 or set it equal"
        )
    if lc.time_min * 60 <= lc.signal_delay_s:
        raise ConfigError(
            f"launcher.time_min={lc.time_min} min is not longer than launcher.signal_delay_s="
            f"{lc.signal_delay_s} s: the pre-timeout signal would arrive before training starts; "
            "raise time_min or lower signal_delay_s"
        )
    warning = allocation_warning(cfg)
    if warning:
        log.warning("%s", warning)
    if ck.enabled and ck.every_minutes and lc.time_min < ck.every_minutes:
        raise ConfigError(
            f"launcher.time_min={lc.time_min} is shorter than checkpoint.every_minutes={ck.every_minutes}: "
            "no periodic checkpoint would ever be written inside one allocation; lower "
            "checkpoint.every_minutes or raise launcher.time_min"
        )
    if lc.max_requeues > 0 and not (ck.enabled and ck.save_at_end):
        raise ConfigError(
            f"launcher.max_requeues={lc.max_requeues} needs checkpoint.enabled=true and "
            "checkpoint.save_at_end=true: a requeued job resumes from the checkpoint written on the "
            "pre-timeout signal (or set launcher.max_requeues=0)"
        )
    if lc.logs_dir is not None and not lc.logs_dir.strip():
        raise ConfigError("launcher.logs_dir must be a folder path or null (= <run_dir>/slurm)")
    check_job_layout(cfg, world_size(cfg))


def training_share(time_min: int, signal_delay_s: int, startup_s: float) -> float:
    """Share of one allocation left for training steps: time limit minus start-up minus the
    pre-timeout signal delay (after the signal the job only saves), over the time limit."""
    total = time_min * 60
    return max(total - startup_s - signal_delay_s, 0) / total


def allocation_warning(cfg: Config, startup_s: float | None = None) -> str | None:
    """The warning for an allocation that would mostly start up and save (each requeue then buys
    only seconds of training), or None. Rule: (time_min*60 - startup - signal_delay_s) / (time_min*60)
    must be at least MIN_TRAINING_SHARE."""
    lc = cfg.launcher
    if startup_s is None:
        startup_s = STARTUP_S_GPU if lc.gpus_per_node > 0 else STARTUP_S_CPU
    share = training_share(lc.time_min, lc.signal_delay_s, startup_s)
    if share >= MIN_TRAINING_SHARE:
        return None
    train_s = share * lc.time_min * 60
    return (
        f"launcher.time_min={lc.time_min} min with launcher.signal_delay_s={lc.signal_delay_s} s leaves "
        f"about {train_s:.0f} s ({share:.0%}) of each allocation for training after an estimated "
        f"{startup_s:.0f} s of start-up, less than {MIN_TRAINING_SHARE:.0%}: every requeue would mostly "
        f"start up and save. Raise launcher.time_min to at least "
        f"{min_time_min(lc.signal_delay_s, startup_s)} or lower launcher.signal_delay_s"
    )


def min_time_min(signal_delay_s: int, startup_s: float) -> int:
    """Smallest whole-minute time limit with at least MIN_TRAINING_SHARE left for training."""
    need_s = (startup_s + signal_delay_s) / (1 - MIN_TRAINING_SHARE)
    return max(1, -int(-need_s // 60))


def check_job_layout(cfg: Config, world: int) -> None:
    """The parallel layout and batch geometry must fit the number of tasks the job will have (the same
    rules the ranks apply, checked before submission)."""
    from llmtrain.parallel.layout import build_dims

    try:
        build_dims(cfg, world)
    except ConfigError as e:
        lc = cfg.launcher
        raise ConfigError(
            f"{e} (SLURM world = launcher.nodes={lc.nodes} x {tasks_per_node(cfg)} tasks per node)"
        ) from None


@dataclass(frozen=True)
class Partition:
    """What `sinfo` says about one partition (per-node maxima over its nodes)."""

    name: str
    is_default: bool
    num_nodes: int
    max_cpus: int
    max_gpus: int
    available: bool


def _gpus_in_gres(gres: str) -> int:
    """`gpu:8`, `gpu:a100:4(S:0-1)`, `gpu:2,shard:8` or `(null)` -> number of GPUs."""
    total = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Parse `sinfo -h -N -o '%P|%a|%N|%c|%G'` (one line per node and partition)."""
    nodes: dict[str, set[str]] = {}
    info: dict[str, dict] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        part, avail, node, cpus, gres = line.split("|", 4)
        name = part.rstrip("*")
        d = info.setdefault(name, {"default": part.endswith("*"), "cpus": 0, "gpus": 0, "up": False})
        nodes.setdefault(name, set()).add(node)
        d["cpus"] = max(d["cpus"], int(re.sub(r"\D", "", cpus) or 0))
        d["gpus"] = max(d["gpus"], _gpus_in_gres(gres))
        d["up"] = d["up"] or avail.strip() == "up"
    return {
        n: Partition(n, d["default"], len(nodes[n]), d["cpus"], d["gpus"], d["up"]) for n, d in info.items()
    }


def query_partitions(timeout_s: float = 20.0) -> dict[str, Partition]:
    """Ask the cluster; raise ConfigError when the SLURM client tools are missing or unresponsive."""
    if shutil.which("sinfo") is None:
        raise ConfigError(
            "launcher=slurm needs the SLURM client tools (sinfo, sbatch) on this machine: run from a "
            "login node, or use launcher=local / launcher=torchrun"
        )
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%P|%a|%N|%c|%G"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"sinfo did not answer within {timeout_s:.0f}s: is slurmctld reachable?") from None
    if out.returncode != 0:
        raise ConfigError(f"sinfo failed (is the SLURM controller up?): {out.stderr.strip()}")
    return parse_sinfo(out.stdout)


def check_cluster(cfg: Config, partitions: dict[str, Partition]) -> Partition:
    """Pick the partition (given or the cluster default) and check the request fits its nodes."""
    lc = cfg.launcher
    names = ", ".join(sorted(partitions)) or "<none>"
    if lc.partition is None:
        defaults = [p for p in partitions.values() if p.is_default]
        if not defaults:
            raise ConfigError(
                f"launcher.partition is required: this cluster has no default partition; choose one of: {names}"
            )
        part = defaults[0]
    elif lc.partition not in partitions:
        raise ConfigError(f"launcher.partition={lc.partition!r} does not exist; choose one of: {names}")
    else:
        part = partitions[lc.partition]
    where = f"partition {part.name!r}"
    if not part.available:
        raise ConfigError(f"launcher.partition: {where} is not up (sinfo AVAIL); choose one of: {names}")
    if lc.nodes > part.num_nodes:
        raise ConfigError(f"launcher.nodes={lc.nodes} but {where} has only {part.num_nodes} node(s)")
    if lc.gpus_per_node > part.max_gpus:
        raise ConfigError(
            f"launcher.gpus_per_node={lc.gpus_per_node} but the nodes of {where} have at most "
            f"{part.max_gpus} GPU(s) (sinfo GRES); use launcher.gpus_per_node<={part.max_gpus}"
            + (" and launcher.nproc for CPU ranks" if part.max_gpus == 0 else "")
        )
    need = tasks_per_node(cfg) * lc.cpus_per_task
    if part.max_cpus and need > part.max_cpus:
        raise ConfigError(
            f"{tasks_per_node(cfg)} tasks per node x launcher.cpus_per_task={lc.cpus_per_task} = {need} "
            f"CPUs, but the nodes of {where} have at most {part.max_cpus}"
        )
    return part
