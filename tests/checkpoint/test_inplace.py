"""The in-place DCP load (checkpoint/inplace.py): tensor bytes land in the live tensors' own storage,
bitwise equal to what was saved; items it cannot read in place take torch's path with the same
result; non-tensor items are decoded without an unrestricted unpickle."""

import io
import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from llmtrain.checkpoint import CheckpointManager, RankState, TrainerState, inplace
from llmtrain.checkpoint.dcp_io import read_metadata, single_process_dcp
from llmtrain.checkpoint.inplace import load_in_place
from tests.checkpoint.common import TINY, assert_same, make_engine, snapshot, step


def _save_dcp(state: dict, folder: Path) -> None:
    with single_process_dcp():
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def _load(state: dict, folder: Path):
    with single_process_dcp():
        return load_in_place(state, folder, no_dist=True)


def test_tensors_are_read_into_the_live_storage_and_the_rest_falls_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    saved = {
        "w": torch.randn(64, 48, generator=g),
        "t": torch.randn(48, 64, generator=g),  # loaded into a transposed view: not contiguous
        "h": torch.randn(32, generator=g).bfloat16(),
        "step": torch.tensor(7.0),
        "lr": 3e-4,
        "betas": (0.9, 0.95),
        "tag": "adamw",
    }
    _save_dcp(saved, tmp_path / "ck")
    live = {
        "w": torch.zeros(64, 48),
        "t": torch.zeros(64, 48).t(),
        "h": torch.zeros(32, dtype=torch.bfloat16),
        "step": torch.tensor(0.0),
        "lr": 0.0,
        "betas": (0.0, 0.0),
        "tag": "",
    }
    ptrs = {k: v.data_ptr() for k, v in live.items() if isinstance(v, torch.Tensor)}
    reader = _load(live, tmp_path / "ck")
    assert (reader.in_place, reader.fallback) == (3, 1)  # w, h, step in place; t through torch.load
    for k in ("w", "t", "h", "step"):
        assert torch.equal(live[k], saved[k]) and live[k].data_ptr() == ptrs[k]
    assert (live["lr"], live["betas"], live["tag"]) == (3e-4, (0.9, 0.95), "adamw")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_non_tensor_item_holding_an_object_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save_dcp({"x": _Evil(), "w": torch.ones(3)}, tmp_path / "ck")
    with pytest.raises(CheckpointException) as e:  # DCP's wrapper of the rank's error
        _load({"x": None, "w": torch.zeros(3)}, tmp_path / "ck")
    assert "posix.system" in str(e.value) + repr(getattr(e.value, "failures", ""))
    assert not (tmp_path / "pwned").exists()


def test_engine_load_reads_every_tensor_in_place_and_restores_bitwise(make_config, tmp_path, monkeypatch):
    """CheckpointManager.load through the native engine: model and Adam state (step counts included)
    bitwise as saved, every tensor item read in place (none through torch's buffer + copy)."""
    eng = make_engine(make_config(*TINY))
    step(eng)
    mgr = CheckpointManager(tmp_path / "ck")
    path = mgr.save(1, eng, TrainerState(), RankState()).path
    saved = snapshot(eng)
    step(eng, seed=1)  # move every parameter and moment away from the checkpoint
    readers: list[inplace.InPlaceReader] = []
    real = inplace.load_in_place
    monkeypatch.setattr(
        inplace, "load_in_place", lambda *a, **k: readers.append(real(*a, **k)) or readers[-1]
    )
    import llmtrain.parallel.native as native

    monkeypatch.setattr(native, "load_in_place", inplace.load_in_place)
    mgr.load(path, eng)
    assert_same(snapshot(eng), saved)
    md = read_metadata(path / "model_optim")
    n_tensors = sum(isinstance(v, TensorStorageMetadata) for v in md.state_dict_metadata.values())
    assert [(r.in_place, r.fallback) for r in readers] == [(n_tensors, 0)]


class _TracedFile(io.FileIO):
    """A shard file that records (offset, bytes) of every read."""

    reads: list[tuple[int, int]] = []

    def read(self, n: int = -1) -> bytes:
        at, out = self.tell(), super().read(n)
        self.reads.append((at, len(out)))
        return out

    def readinto(self, buf) -> int:
        at, got = self.tell(), super().readinto(buf)
        self.reads.append((at, got))
        return got


def test_each_shard_is_read_once_front_to_back_into_bitwise_tensors(tmp_path, monkeypatch):
    """Tensors around the size of the first bytes read (inplace._HEAD: smaller, equal, larger), dtypes,
    a scalar: loaded into garbage-filled live tensors bitwise, all in place, and the shard file read
    in one forward pass that reads no byte twice (what makes a cold load run at the disk's rate)."""
    g = torch.Generator().manual_seed(1)
    sizes = [1, 7, 1000, 1024, 1040, 3000, 70_000]
    saved = {f"f{n}": torch.randn(n, generator=g) for n in sizes}
    saved |= {
        "b": torch.randn(33, 129, generator=g).bfloat16(),
        "i": torch.arange(5000),
        "s": torch.tensor(3.0),
    }
    saved |= {"lr": 1e-3, "name": "x"}
    _save_dcp(saved, tmp_path / "ck")
    live = {k: torch.full_like(v, 7) if torch.is_tensor(v) else None for k, v in saved.items()}
    _TracedFile.reads = []
    monkeypatch.setattr(inplace, "open", lambda p, *a, **k: _TracedFile(p, "rb"), raising=False)
    reader = _load(live, tmp_path / "ck")
    assert (reader.in_place, reader.fallback) == (len(sizes) + 3, 0)
    for k, v in saved.items():
        assert torch.equal(live[k], v) if torch.is_tensor(v) else live[k] == v, k
    reads = [r for r in _TracedFile.reads if r[1]]
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(reads)), reads
    shard = next((tmp_path / "ck").glob("*.distcp")).stat().st_size
    assert sum(n for _, n in reads) <= shard
