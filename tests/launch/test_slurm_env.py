"""SLURM environment parsing as real clusters set it: SLURM_TASKS_PER_NODE in `N(xK),M` form,
SLURM_NTASKS_PER_NODE absent (it is only set by --ntasks-per-node), bracketed node lists, and nodes with
different task counts refused with what SLURM gave; the rendezvous host from NodeAddr and a rendezvous
that ends within its timeout naming host:port (real TCPStores on 127.0.0.1)."""

import socket
import threading
import time

import pytest

from llmtrain.config import ConfigError
from llmtrain.distributed.env import detect_env, parse_tasks_per_node, slurm_local_world_size
from llmtrain.launch.rendezvous import (
    PORT_SPAN,
    RendezvousError,
    first_host,
    meet,
    parse_node_addr,
    rendezvous_host,
    rendezvous_port,
)


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


def test_node_addr_from_scontrol_output():
    line = "NodeName=n1 Arch=x86_64 CoresPerSocket=1 NodeAddr=127.0.0.1 NodeHostName=n1 Port=17001"
    assert parse_node_addr(line) == "127.0.0.1"
    assert parse_node_addr("NodeName=n1 NodeAddr=(null)") is None and parse_node_addr("") is None
    # no scontrol answer for the node (not a node of the cluster, or no cluster): name resolution
    assert rendezvous_host("llmtrain-no-such-node[1-2]") == "llmtrain-no-such-node1"


def test_ports_of_concurrent_jobs_differ():
    """Any PORT_SPAN consecutive job ids (jobs alive at once on a node) get distinct ports, the same
    for every task and requeue of a job; array tasks have job ids of their own."""
    ports = {rendezvous_port(str(j)) for j in range(987_654, 987_654 + PORT_SPAN)}
    assert len(ports) == PORT_SPAN and min(ports) >= 15000 and max(ports) < 32768
    assert rendezvous_port("123_4") == rendezvous_port("123")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendezvous_meets_or_ends_in_time_naming_host_and_port():
    port = _free_port()
    got: list[object] = []
    server = threading.Thread(target=lambda: got.append(meet("127.0.0.1", port, 0, 2, 10)))
    server.start()
    client = meet("127.0.0.1", port, 1, 2, 10)
    server.join(15)
    client.set("k", "v")
    assert got[0].get("k") == b"v"  # both ends hold one store
    with pytest.raises(RendezvousError, match=rf"rank 0/2: rendezvous failed serving 127.0.0.1:{port} "):
        meet("127.0.0.1", port, 0, 2, 1)  # the port is taken (by the store above)
    t0 = time.monotonic()
    with pytest.raises(RendezvousError, match=r"rank 1/2: .* reaching no-such-node.invalid:15001 within 1s"):
        meet("no-such-node.invalid", 15001, 1, 2, 1)  # a node name that does not resolve
    alone = _free_port()
    with pytest.raises(RendezvousError, match=rf"rank 0/2: .* serving 127.0.0.1:{alone} .*1/2 clients"):
        meet("127.0.0.1", alone, 0, 2, 1)  # the other task never comes
    assert time.monotonic() - t0 < 15
