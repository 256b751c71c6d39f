"""SLURM environment parsing as real clusters set it: SLURM_TASKS_PER_NODE in `N(xK),M` form,
SLURM_NTASKS_PER_NODE absent (it is only set by --ntasks-per-node), bracketed node lists, and nodes with
different task counts refused with what SLURM gave."""

import pytest

from llmtrain.config import ConfigError
from llmtrain.distributed.env import detect_env, parse_tasks_per_node, slurm_local_world_size
from llmtrain.launch.slurm_job import first_host


@pytest.mark.parametrize(
    ("value", "counts"),
    [("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("8(x2),4(x1)", [8, 8, 4])],
)
def test_tasks_per_node_forms(value, counts):
    assert parse_tasks_per_node(value) == counts


def test_a_malformed_value_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE='x'"):
        parse_tasks_per_node("x")


def test_local_world_size_without_ntasks_per_node():
    """The old code read SLURM_NTASKS_PER_NODE (absent without --ntasks-per-node) and fell back to the
    whole job's task count: 8 ranks per node on a 2 x 4 job."""
    env = {"SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert slurm_local_world_size(env) == 4
    assert detect_env_from(env) == (5, 1, 8, 4)


def test_unequal_nodes_are_refused_naming_what_slurm_gave():
    with pytest.raises(
        ConfigError, match=r"SLURM_TASKS_PER_NODE=2\(x3\),1: .*\[2, 2, 2, 1\].*--ntasks-per-node"
    ):
        slurm_local_world_size({"SLURM_NTASKS": "7", "SLURM_TASKS_PER_NODE": "2(x3),1"})


def test_first_host_of_bracketed_node_lists():
    assert first_host("gpu[001-004,010],cpu7") == "gpu001"
    assert first_host("n[1-2]") == "n1" and first_host("") == "127.0.0.1"


def detect_env_from(env: dict[str, str]) -> tuple[int, int, int, int]:
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, env, clear=True):
        e = detect_env()
    return e.rank, e.local_rank, e.world_size, e.local_world_size
