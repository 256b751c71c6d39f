"""Weighted mixing of several datasets: realised token shares match the weights; resume is exact."""

import numpy as np
import pytest
import torch

from llmtrain.data import IGNORE_INDEX, DataLoader, TokenDataset
from tests.data.conftest import random_lengths

SEQ = 32
BASE = 10_000_000  # token values of source i lie in [2 + i*BASE, 2 + (i+1)*BASE)


def sources(synth, packing: str, lengths: list[np.ndarray]) -> list[TokenDataset]:
    return [
        TokenDataset(synth(f"s{i}", ls, base=i * BASE, docs_per_shard=40), SEQ, packing=packing)
        for i, ls in enumerate(lengths)
    ]


def realised_token_shares(dl: DataLoader, steps: int, k: int) -> np.ndarray:
    """Loss-carrying target tokens per source over `steps` steps, as shares."""
    tokens = np.zeros(k)
    for _ in range(steps):
        for b in dl.next_step():
            rows_src = (b.inputs.max(dim=1).values - 2) // BASE  # a sample comes from one source
            carried = (b.targets != IGNORE_INDEX).sum(dim=1)
            for s in range(k):
                tokens[s] += int(carried[rows_src == s].sum())
    return tokens / tokens.sum()


@pytest.mark.parametrize("packing", ["concat", "whole_documents"])
def test_realised_token_shares_match_weights(synth, packing: str) -> None:
    # very different document lengths, so padding (whole_documents) differs a lot between sources
    lengths = [random_lengths(200, 3, 12, 1), random_lengths(100, 20, 33, 2), random_lengths(80, 40, 300, 3)]
    weights = [0.6, 0.3, 0.1]
    dl = DataLoader(
        sources(synth, packing, lengths), weights=weights, micro_batch_size=4, grad_accum=2, seed=3
    )
    shares = realised_token_shares(dl, 150, 3)  # 1200 samples: the smallest source cycles epochs
    np.testing.assert_allclose(shares, weights, atol=0.002)


def test_mixed_resume_is_exact_across_dp_sizes(synth) -> None:
    lengths = [random_lengths(60, 5, 40, 4), random_lengths(60, 5, 40, 5)]
    ds = sources(synth, "whole_documents", lengths)
    w = [0.7, 0.3]
    ref = DataLoader(ds, weights=w, micro_batch_size=8, grad_accum=1, seed=1)
    first = DataLoader(ds, weights=w, micro_batch_size=2, grad_accum=2, dp_rank=1, dp_size=2, seed=1)
    for _ in range(20):
        ref.next_step()
        first.next_step()
    state = first.state_dict()
    assert state["source_consumed"] == ref.state_dict()["source_consumed"]
    ranks = [
        DataLoader(ds, weights=w, micro_batch_size=4, grad_accum=1, dp_rank=r, dp_size=2, seed=1)
        for r in range(2)
    ]
    for dl in ranks:
        dl.load_state_dict(state)
    for _ in range(50):
        want = ref.next_step()[0]
        got = [dl.next_step()[0] for dl in ranks]
        assert torch.equal(torch.cat([g.inputs for g in got]), want.inputs)
        assert torch.equal(torch.cat([g.targets for g in got]), want.targets)
