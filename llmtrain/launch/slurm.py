"""SLURM launcher: check the request, prepare the run folder, submit with submitit, say how to watch.

    llmtrain launcher=slurm launcher.partition=gpu launcher.nodes=4 launcher.gpus_per_node=8 ...
    llmtrain -m launcher=slurm optim.lr=1e-3,3e-4      # one job array, one run folder per member

Runs on the login node. Data is tokenized here (first use) and the resolved config written to
`<run_dir>/config.yaml` before sbatch, so the job only reads. The job itself is
`llmtrain.launch.slurm_job.TrainJob`: one task per GPU (or CPU rank), pre-timeout signal, requeue.
"""

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmtrain.config import Config, ConfigError
from llmtrain.launch.runs import ACTIVE_STATES, JobRecord, job_records, job_states, record_job
from llmtrain.launch.slurm_agent import agent_parameters, uses_agents
from llmtrain.launch.slurm_checks import check_cluster, check_static, query_partitions, tasks_per_node
from llmtrain.launch.slurm_job import TrainJob
from llmtrain.tracking.commands import runs_tool, tail_command

log = logging.getLogger("llmtrain")


def _sweep_id() -> str | None:
    """Members of one Hydra multirun share the sweep folder's name (a timestamp)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def slurm_parameters(cfg: Config, partition: str | None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters derived from the typed config (never kept by hand)."""
    lc = cfg.launcher
    params: dict[str, Any] = {
        "job_name": cfg.run.name,
        "partition": partition,
        "time": lc.time_min,
        "nodes": lc.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": lc.cpus_per_task,
        "signal_delay_s": lc.signal_delay_s,  # -> --signal=USR2@<s>
        "setup": list(lc.setup),
        # one task failing (e.g. rank 0 refused the run folder's lease) ends its siblings, which
        # would otherwise wait at the rendezvous until it times out
        "srun_args": [
            *lc.srun_args,
            *([] if _has_flag(lc.srun_args, "--kill-on-bad-exit") else ["--kill-on-bad-exit=1"]),
        ],
        "additional_parameters": {"requeue": True, **dict(lc.sbatch_args)},
    }
    if lc.gpus_per_node:
        params["gpus_per_node"] = lc.gpus_per_node
    optional = {
        "account": lc.account,
        "qos": lc.qos,
        "constraint": lc.constraint,
        "mem": f"{lc.mem_gb}GB" if lc.mem_gb else None,
        "exclusive": True if lc.exclusive else None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return agent_parameters(cfg, params) if uses_agents(cfg) else params


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def absolute_paths(cfg: Config) -> Config:
    """Relative paths mean the login node's cwd; make them absolute so the job reads the same files."""
    sources = [
        s if "://" in s.path else replace(s, path=str(Path(s.path).resolve())) for s in cfg.data.sources
    ]
    return replace(
        cfg,
        run=replace(cfg.run, root=str(Path(cfg.run.root).resolve())),
        data=replace(cfg.data, sources=sources),
    )


def _refuse_duplicate(run_dir: Path) -> None:
    """Two live jobs writing one run folder would corrupt it: refuse before sbatch."""
    ids = [r.job_id for r in job_records(run_dir)]
    live = {j: s for j, s in job_states(ids[-3:]).items() if s in ACTIVE_STATES}
    if live:
        jobs = ", ".join(f"{j} ({s})" for j, s in live.items())
        raise ConfigError(
            f"run.name={run_dir.name!r} already has a live SLURM job: {jobs}. Wait for it, cancel it "
            f"({runs_tool('cancel', str(run_dir.absolute()))}) or choose another run.name"
        )


@dataclass
class Prepared:
    """One run, checked and with its run folder written, ready for sbatch."""

    cfg: Config
    run_dir: Path
    partition: str
    params: dict[str, Any]
    sweep: str | None

    def job(self) -> TrainJob:
        lc = self.cfg.launcher
        return TrainJob(
            str(self.run_dir / "config.yaml"), lc.max_requeues, lc.time_min, uses_agents(self.cfg)
        )


def prepare(cfg: Config) -> Prepared:
    """Every check (config, cluster, no live job on the run folder), then the run folder itself."""
    from llmtrain.launch.lease import check_free
    from llmtrain.launch.local import preflight, prepare_run

    check_static(cfg)
    part = check_cluster(cfg, query_partitions())
    cfg = absolute_paths(cfg)
    check_free(Path(cfg.run.root) / cfg.run.name)  # a running local/torchrun/SLURM job holds it
    _refuse_duplicate(Path(cfg.run.root) / cfg.run.name)  # a queued job does not yet
    preflight(cfg, Path(cfg.run.root) / cfg.run.name)
    run_dir = prepare_run(cfg)
    partition = cfg.launcher.partition or part.name
    return Prepared(cfg, run_dir, partition, slurm_parameters(cfg, partition), _sweep_id())


def _record(p: Prepared, job: Any) -> JobRecord:
    rec = JobRecord(
        job_id=job.job_id,
        run_name=p.cfg.run.name,
        run_dir=str(p.run_dir),
        sweep=p.sweep,
        submitted_at=time.time(),
        stdout=str(job.paths.stdout).replace("%t", "0"),
        stderr=str(job.paths.stderr).replace("%t", "0"),
    )
    record_job(rec, p.run_dir / "slurm")
    _announce(p.cfg, rec, p.partition)
    return rec


def submit_job(cfg: Config) -> Any:
    """Validate, prepare and submit; return the submitit Job (tests and tools wait on it)."""
    import submitit

    p = prepare(cfg)
    lc = p.cfg.launcher
    folder = Path(lc.logs_dir).resolve() if lc.logs_dir else p.run_dir / "slurm"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=lc.max_requeues)
    executor.update_parameters(**p.params)
    job = executor.submit(p.job())
    _record(p, job)
    return job


def submit_array(members: list[Prepared]) -> list[Any]:
    """Sweep members that ask for the same resources become one SLURM job array (one sbatch; each
    task its own run folder, MLflow run and requeue budget); members with other resources get their
    own arrays. Logs go to <run.root>/slurm-sweeps/<sweep>/ (an array has one log folder)."""
    import submitit

    groups: dict[str, list[Prepared]] = {}
    for m in members:
        key = json.dumps({k: v for k, v in m.params.items() if k != "job_name"}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(m)
    jobs = []
    for group in groups.values():
        first = group[0]
        lc = first.cfg.launcher
        folder = (
            Path(lc.logs_dir).resolve()
            if lc.logs_dir
            else (Path(first.cfg.run.root) / "slurm-sweeps" / (first.sweep or first.cfg.run.name))
        )
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=lc.max_requeues)
        executor.update_parameters(
            **{**first.params, "job_name": f"{first.sweep or 'sweep'}-{first.cfg.run.name}"}
        )
        with executor.batch():
            batch = [executor.submit(m.job()) for m in group]
        for m, job in zip(group, batch, strict=True):
            _record(m, job)
        jobs += batch
    return jobs


def _announce(cfg: Config, rec: JobRecord, partition: str) -> None:
    lc = cfg.launcher
    lines = [
        f"submitted SLURM job {rec.job_id}: run {cfg.run.name!r} on partition {partition}, "
        f"{lc.nodes} node(s) x {tasks_per_node(cfg)} task(s), {lc.time_min} min, "
        f"up to {lc.max_requeues} requeue(s)",
        f"  run folder: {rec.run_dir}",
        f"  logs (rank 0): {rec.stdout}",
        f"                 {rec.stderr}",
        f"  follow:  {tail_command(rec.stdout, rec.stderr)}",
        f"  status:  {runs_tool('status', rec.run_dir)}",
        f"  cancel:  {runs_tool('cancel', rec.run_dir)}",
    ]
    if rec.sweep:
        lines.append(f"  sweep:   {runs_tool('list', '--root', cfg.run.root, '--sweep', rec.sweep)}")
    print("\n".join(lines), flush=True)


_SWEEP: list[Prepared] = []


def submit(cfg: Config) -> int:
    """CLI entry for launcher=slurm: returns 0 once the job is queued (errors raise ConfigError).
    Inside a Hydra multirun the member is checked and prepared now and submitted with the others as
    a job array by `flush_sweep` once Hydra has visited every member."""
    if _sweep_id() is None:
        submit_job(cfg)
    else:
        p = prepare(cfg)
        _SWEEP.append(p)
        print(f"prepared sweep member {cfg.run.name!r} ({p.run_dir}); submitting with the sweep", flush=True)
    return 0


def flush_sweep() -> list[Any]:
    """Submit the sweep members prepared by `submit` (called by the CLI after the multirun)."""
    members, _SWEEP[:] = list(_SWEEP), []
    return submit_array(members) if members else []
