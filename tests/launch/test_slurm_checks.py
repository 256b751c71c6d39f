"""Pre-submission checks and the config -> sbatch/rendezvous mapping (no cluster needed)."""

import pytest

from llmtrain.config import ConfigError
from llmtrain.launch.rendezvous import first_host, rendezvous_port
from llmtrain.launch.slurm import slurm_parameters
from llmtrain.launch.slurm_checks import check_cluster, check_static, parse_sinfo
from llmtrain.launch.slurm_job import set_dist_env

# `sinfo -h -N -o '%P|%a|%N|%c|%G'` as printed by a two-partition GPU cluster (one line per node).
SINFO = """gpu*|up|g001|64|gpu:a100:8(S:0-1)
gpu*|up|g002|64|gpu:a100:8(S:0-1)
cpu|up|c001|128|(null)
old|down|o001|16|gpu:2
"""


def test_parse_sinfo_per_partition_maxima() -> None:
    parts = parse_sinfo(SINFO)
    assert sorted(parts) == ["cpu", "gpu", "old"]
    g = parts["gpu"]
    assert (g.is_default, g.num_nodes, g.max_cpus, g.max_gpus, g.available) == (True, 2, 64, 8, True)
    assert (parts["cpu"].max_gpus, parts["cpu"].is_default) == (0, False)
    assert parts["old"].available is False


def test_check_cluster_picks_default_and_rejects_bad_requests(make_config) -> None:
    parts = parse_sinfo(SINFO)
    cfg = make_config("launcher=slurm", "launcher.gpus_per_node=8", "launcher.nodes=2")
    assert check_cluster(cfg, parts).name == "gpu"
    with pytest.raises(ConfigError, match=r"gpus_per_node=16 but .* at most 8 GPU"):
        check_cluster(make_config("launcher=slurm", "launcher.gpus_per_node=16"), parts)
    with pytest.raises(ConfigError, match=r"launcher.nodes=3 but partition 'gpu' has only 2"):
        check_cluster(make_config("launcher=slurm", "launcher.nodes=3"), parts)
    with pytest.raises(ConfigError, match=r"partition='nope' does not exist; choose one of: cpu, gpu, old"):
        check_cluster(make_config("launcher=slurm", "launcher.partition=nope"), parts)
    with pytest.raises(ConfigError, match="not up"):
        check_cluster(make_config("launcher=slurm", "launcher.partition=old"), parts)
    with pytest.raises(ConfigError, match=r"= 256 CPUs, but .* at most 128"):
        check_cluster(
            make_config(
                "launcher=slurm", "launcher.partition=cpu", "launcher.nproc=2", "launcher.cpus_per_task=128"
            ),
            parts,
        )
    no_default = parse_sinfo(SINFO.replace("gpu*", "gpu"))
    with pytest.raises(ConfigError, match=r"launcher.partition is required: this cluster has no default"):
        check_cluster(cfg, no_default)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["launcher.time_min=10", "checkpoint.every_minutes=30"], "shorter than checkpoint.every_minutes=30"),
        (["launcher.time_min=2", "launcher.signal_delay_s=120"], "not longer than launcher.signal_delay_s"),
        (["checkpoint.save_at_end=false"], "needs checkpoint.enabled=true and checkpoint.save_at_end=true"),
        (["launcher.gpus_per_node=4", "launcher.nproc=2"], "conflicts with launcher.gpus_per_node=4"),
        (["launcher.nproc=3", "parallel.dp_replicate=1", "parallel.tp=2"], "does not fit the world size 3"),
        (["launcher.nproc=3"], "global_batch_size=.* must be divisible"),
        (["launcher.rdzv_timeout_s=0"], r"launcher.rdzv_timeout_s=0 must be >= 1"),
    ],
)
def test_check_static_names_the_keys(make_config, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_static(make_config("launcher=slurm", *overrides))


def test_check_static_accepts_a_sane_request(make_config) -> None:
    check_static(
        make_config(
            "launcher=slurm", "launcher.gpus_per_node=8", "launcher.nodes=4", "trainer.global_batch_size=256"
        )
    )


def test_slurm_parameters_mapping(make_config) -> None:
    cfg = make_config(
        "launcher=slurm",
        "launcher.gpus_per_node=8",
        "launcher.nodes=4",
        "launcher.mem_gb=512",
        "launcher.account=proj",
        "launcher.exclusive=true",
        "+launcher.sbatch_args.mail-type=END",
        "run.name=big",
    )
    p = slurm_parameters(cfg, "gpu")
    assert (p["ntasks_per_node"], p["gpus_per_node"], p["nodes"], p["time"]) == (8, 8, 4, 60)
    assert (p["mem"], p["account"], p["exclusive"], p["job_name"]) == ("512GB", "proj", True, "big")
    assert p["additional_parameters"] == {"requeue": True, "mail-type": "END"}
    cpu = slurm_parameters(make_config("launcher=slurm", "launcher.nproc=2"), "debug")
    assert cpu["ntasks_per_node"] == 2 and "gpus_per_node" not in cpu and "mem" not in cpu


@pytest.mark.parametrize(
    "per_node",
    [{"SLURM_JOB_NUM_NODES": "2"}, {"SLURM_TASKS_PER_NODE": "8(x2)"}],
    ids=["nodes-only", "tasks-per-node"],  # the second is what a job step sets (SLURM_NTASKS_PER_NODE absent)
)
def test_rendezvous_from_slurm_env(per_node: dict[str, str]) -> None:
    env = {
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "16",
        **per_node,
        "SLURM_JOB_NODELIST": "gpu[003-004]",
        "SLURM_JOB_ID": "123456",
    }
    got = set_dist_env(env)
    assert got == {
        "RANK": "9",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "16",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": str(rendezvous_port("123456")),
    }
    assert rendezvous_port("123456") == rendezvous_port("123456") == 15000 + 123456 % 10000
    assert rendezvous_port("123457") != rendezvous_port("123456")
    assert first_host("cpu[10-11,20],gpu1") == "cpu10"


@pytest.mark.parametrize(
    ("status", "received", "restarts", "outcome"),
    [
        ("FINISHED", {"SIGUSR2"}, 0, "finished"),  # the signal came after the last step
        ("KILLED", {"SIGUSR2"}, 0, "requeue"),  # pre-timeout warning
        ("KILLED", {"SIGTERM", "SIGUSR2"}, 1, "requeue"),  # submitit-style preemption
        ("KILLED", set(), 0, "requeue"),  # only another rank was signalled
        ("KILLED", {"SIGTERM"}, 0, "terminated"),  # scancel / scheduler preemption: no self-requeue
        ("KILLED", {"SIGUSR2"}, 2, "exhausted"),  # launcher.max_requeues=2 used up
    ],
)
def test_job_outcome_after_a_stop(status: str, received: set[str], restarts: int, outcome: str) -> None:
    from llmtrain.launch.slurm_job import TrainJob

    assert (
        TrainJob("config.yaml", max_requeues=2, time_min=10)._agree_outcome(status, received, restarts)
        == outcome
    )


def test_relative_paths_become_absolute(make_config, tmp_path, monkeypatch) -> None:
    from llmtrain.launch.slurm import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(make_config("launcher=slurm", "run.root=rel_runs", "data.sources.0.path=rel_data"))
    assert cfg.run.root == str(tmp_path / "rel_runs") and cfg.data.sources[0].path == str(
        tmp_path / "rel_data"
    )


def test_short_allocation_warns_with_the_rule_and_the_numbers(make_config, caplog) -> None:
    """time_min=1 with signal_delay_s=30 passed every check, yet each allocation trained 7-10 s."""
    import logging

    from llmtrain.launch.slurm_checks import STARTUP_S_CPU, allocation_warning, min_time_min, training_share

    assert STARTUP_S_CPU == 30
    assert training_share(1, 30, 30) == 0.0  # 60 s - 30 s start-up - 30 s signal delay
    assert training_share(10, 60, 30) == pytest.approx(0.85)  # (600 - 30 - 60) / 600
    assert training_share(2, 30, 30) == pytest.approx(0.5)
    assert min_time_min(30, 30) == 2 and min_time_min(120, 90) == 7  # 420 s needed -> 7 min
    short = make_config("launcher=slurm", "launcher.time_min=1", "launcher.signal_delay_s=30")
    msg = allocation_warning(short)
    assert msg == (
        "launcher.time_min=1 min with launcher.signal_delay_s=30 s leaves about 0 s (0%) of each allocation "
        "for training after an estimated 30 s of start-up, less than 50%: every requeue would mostly start "
        "up and save. Raise launcher.time_min to at least 2 or lower launcher.signal_delay_s"
    )
    gpu = make_config(
        "launcher=slurm", "launcher.time_min=5", "launcher.gpus_per_node=8", "launcher.signal_delay_s=120"
    )
    assert "about 90 s (30%)" in allocation_warning(gpu) and "estimated 90 s" in allocation_warning(gpu)
    assert (
        allocation_warning(make_config("launcher=slurm", "launcher.time_min=2", "launcher.signal_delay_s=30"))
        is None
    )
    assert allocation_warning(make_config("launcher=slurm")) is None  # 60 min, 120 s: 96% trains
    caplog.set_level(logging.WARNING, logger="llmtrain")
    check_static(short)  # a warning, not a refusal
    assert [r.getMessage() for r in caplog.records] == [msg]
