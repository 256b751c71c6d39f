"""llmtrain.distributed: bookkeeping collectives on real gloo groups, and the process-group setup a GPU
run gets (one default group serving CUDA tensors through NCCL and host tensors through gloo)."""

import pytest
import torch
import torch.distributed as dist

from llmtrain.distributed import collectives as C
from llmtrain.distributed import env as E
from tests.distributed import run_distributed


def _agree(rank: int, world_size: int) -> dict:
    loss = torch.tensor([float(rank + 1)], dtype=torch.float64)
    return {
        "sum": C.all_reduce_(loss, dist.group.WORLD).item(),
        "any": C.any_rank(rank == 1),
        "none": C.any_rank(False),
        "bcast": C.broadcast_int(100 + rank),
        "objects": C.gather_objects({"rank": rank}),
        "object": C.broadcast_object(f"from {rank}"),
        "device": str(C.comm_device()),
    }


@pytest.mark.distributed
def test_bookkeeping_collectives_agree_on_two_gloo_ranks():
    out = run_distributed(_agree, world_size=2)
    for r in out:
        assert r["sum"] == 3.0 and r["any"] is True and r["none"] is False
        assert r["bcast"] == 100 and r["object"] == "from 0" and r["device"] == "cpu"
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]


def test_without_a_process_group_every_collective_is_the_identity():
    assert not dist.is_initialized()
    t = torch.tensor([2.5])
    assert C.all_reduce_(t, None) is t and t.item() == 2.5
    assert C.any_rank(True) and not C.any_rank(False)
    assert C.broadcast_int(7) == 7 and C.gather_objects("x") == ["x"] and C.broadcast_object(3) == 3


class _Group:
    """Stands in for a process group that serves only the given devices (an NCCL-only subgroup)."""

    def __init__(self, *devices: str) -> None:
        self._device_types = [torch.device(d) for d in devices]


def test_comm_device_follows_the_backends_a_group_serves(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert C.comm_device(_Group("cpu")) == torch.device("cpu")  # gloo
    assert C.comm_device(_Group("cpu", "cuda")) == torch.device("cpu")  # cpu:gloo,cuda:nccl
    assert C.comm_device(_Group("cuda")) == torch.device("cuda", 3)  # nccl only: values go to the GPU
    assert C.comm_device(_Group()) == torch.device("cpu")  # no backend created yet: gloo lazily


def test_gpu_runs_create_one_group_for_cuda_and_host_tensors(monkeypatch):
    """NCCL alone cannot reduce a CPU tensor (the first step of every multi-GPU run failed on the
    token count); the default group must carry gloo for host values."""
    assert E.process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert E.process_group_backend(torch.device("cpu")) == "gloo"
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    E.init_distributed(E.DistEnv(1, 1, 8, 8), torch.device("cuda", 1))
    assert seen["backend"] == "cpu:gloo,cuda:nccl" and seen["device_id"] == torch.device("cuda", 1)
    assert (seen["rank"], seen["world_size"]) == (1, 8)


def test_a_mixed_backend_group_reduces_host_values_on_cpu():
    """The same backend string on CPU (gloo only is registered): bookkeeping works unchanged."""
    store = dist.HashStore()
    dist.init_process_group("cpu:gloo", store=store, rank=0, world_size=1)
    try:
        assert C.comm_device() == torch.device("cpu")
        t = torch.tensor([4.0], dtype=torch.float64)
        assert C.all_reduce_(t, dist.group.WORLD).item() == 4.0 and C.any_rank(True)
    finally:
        dist.destroy_process_group()
