"""Order, dp slicing, epochs and exact resume of the DataLoader (single source; mixing has its own file)."""

import gc
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from llmtrain.data import DataError, DataLoader, TokenDataset
from tests.data.conftest import random_lengths

SEQ = 16


def loader(ds: TokenDataset, **kw) -> DataLoader:
    args = {"micro_batch_size": 2, "grad_accum": 2, "dp_rank": 0, "dp_size": 1, "seed": 7} | kw
    return DataLoader(ds, **args)


def step_tokens(batches) -> list[np.ndarray]:
    """Every row (inputs + last target) of one step, as numpy rows."""
    rows = []
    for b in batches:
        full = torch.cat([b.inputs, b.targets[:, -1:]], dim=1)
        rows.extend(r.numpy().copy() for r in full)
    return rows


@pytest.fixture
def ds(synth) -> TokenDataset:
    folder = synth("d", random_lengths(120), docs_per_shard=20, max_batch_tokens=800)
    return TokenDataset(folder, SEQ)


def test_sample_space_uses_every_record_batch(ds: TokenDataset) -> None:
    assert len(ds.segments) > len(ds.index.shards) > 1  # several shards, several batches each
    expected = sum((t - 1) // SEQ for s in ds.index.shards for t in s.batch_tokens)
    assert ds.num_samples == expected
    # sample j of a record batch is tokens [j*SEQ, j*SEQ + SEQ + 1) of that batch, read independently
    s = ds.read(np.arange(ds.num_samples))
    i = 0
    for info in ds.index.shards:
        with pa.memory_map(str(ds.loc.path + "/" + info.file)) as f:
            reader = pa.ipc.open_file(f)
            for b in range(reader.num_record_batches):
                stream = reader.get_batch(b).column(0).flatten().to_numpy()
                for j in range((len(stream) - 1) // SEQ):
                    np.testing.assert_array_equal(s.tokens[i], stream[j * SEQ : j * SEQ + SEQ + 1])
                    i += 1
    assert i == ds.num_samples


def test_each_epoch_is_a_fresh_permutation_of_all_samples(ds: TokenDataset) -> None:
    n = ds.num_samples
    dl = loader(ds, micro_batch_size=1, grad_accum=1, shuffle=True)
    ids = [dl._sample_ids(0, np.arange(e * n, (e + 1) * n)) for e in range(3)]
    for e in ids:
        assert sorted(e.tolist()) == list(range(n))
    assert (ids[0] != ids[1]).mean() > 0.9 and (ids[1] != ids[2]).mean() > 0.9
    # across shards and within them: a handful of consecutive samples already spans most shards
    shards_hit = {ds.segments[int(seg)][0] for seg in ds.locate(ids[0][:16])[0]}
    assert len(shards_hit) >= min(4, len(ds.index.shards))
    plain = loader(ds, shuffle=False)._sample_ids(0, np.arange(n))
    np.testing.assert_array_equal(plain, np.arange(n))


def test_dp_ranks_get_disjoint_slices_that_cover_the_global_batch(ds: TokenDataset) -> None:
    single = loader(ds, micro_batch_size=2, grad_accum=4, dp_size=1)
    ranks = [loader(ds, micro_batch_size=2, grad_accum=2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):
        whole = {r.tobytes() for r in step_tokens(single.next_step())}
        parts = [{r.tobytes() for r in step_tokens(dl.next_step())} for dl in ranks]
        assert not parts[0] & parts[1]
        assert parts[0] | parts[1] == whole


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_is_bit_exact_for_60_steps_across_epochs(ds: TokenDataset, prefetch: int) -> None:
    steps_per_epoch = ds.num_samples // 4
    k = steps_per_epoch - 5  # the reloaded run crosses an epoch boundary within the next 60 steps
    straight = loader(ds, prefetch=prefetch)
    reference = [straight.next_step() for _ in range(k + 60)]
    first = loader(ds, prefetch=prefetch)
    for _ in range(k):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    first.close()
    resumed = loader(ds, prefetch=prefetch)
    resumed.load_state_dict(state)
    assert resumed.epoch == 0
    for i in range(60):
        got = resumed.next_step()
        for a, b in zip(got, reference[k + i]):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert resumed.epoch >= 1
    straight.close()
    resumed.close()


def test_prefetch_state_counts_only_what_was_handed_over(ds: TokenDataset) -> None:
    dl = loader(ds, prefetch=4)
    dl.next_step()
    dl.next_step()
    assert dl.state_dict()["consumed"] == 2 * dl.global_batch  # not the steps built ahead
    dl.close()


def test_a_dropped_loader_stops_its_prefetch_thread(ds: TokenDataset) -> None:
    dl = loader(ds, prefetch=2)
    dl.next_step()
    thread = dl._prefetcher._thread
    del dl
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize(("old", "new"), [(1, 2), (4, 2), (2, 4)])
def test_resume_under_another_dp_size_keeps_the_global_order(ds: TokenDataset, old: int, new: int) -> None:
    g = 8  # global batch: mb * accum * dp stays 8
    before = [
        loader(ds, micro_batch_size=2, grad_accum=g // (2 * old), dp_rank=r, dp_size=old) for r in range(old)
    ]
    after = [
        loader(ds, micro_batch_size=2, grad_accum=g // (2 * new), dp_rank=r, dp_size=new) for r in range(new)
    ]
    ref = loader(ds, micro_batch_size=g, grad_accum=1)
    for _ in range(3):
        for dl in before:
            dl.next_step()
        ref.next_step()
    state = before[0].state_dict()
    assert all(dl.state_dict() == state for dl in before)  # every rank saves the same cursor
    for dl in after:
        dl.load_state_dict(state)
    for _ in range(10):
        union = sorted(r.tobytes() for dl in after for r in step_tokens(dl.next_step()))
        assert union == sorted(r.tobytes() for r in step_tokens(ref.next_step()))


def test_resume_refuses_changed_data_or_seed(ds: TokenDataset, synth) -> None:
    state = loader(ds).state_dict()
    with pytest.raises(DataError, match=r"data\.seed"):
        loader(ds, seed=8).load_state_dict(state)
    other = TokenDataset(synth("e", random_lengths(60)), SEQ)
    with pytest.raises(DataError, match="samples but the checkpoint"):
        loader(other).load_state_dict(state)


def test_validation_rewind_repeats_the_same_batches(ds: TokenDataset) -> None:
    dl = loader(ds, shuffle=False)
    a = step_tokens(dl.next_step())
    dl.next_step()
    dl.consumed = 0
    b = step_tokens(dl.next_step())
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_resume_under_another_global_batch_continues_the_same_sample_stream(ds: TokenDataset) -> None:
    big = loader(ds, micro_batch_size=4, grad_accum=2)  # 8 samples per step
    for _ in range(3):
        big.next_step()
    small = loader(ds, micro_batch_size=2, grad_accum=2)  # 4 samples per step
    small.load_state_dict(big.state_dict())
    for _ in range(5):
        want = step_tokens(big.next_step())
        got = step_tokens(small.next_step()) + step_tokens(small.next_step())
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
