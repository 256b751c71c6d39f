"""Deterministic, resumable batches for one data-parallel rank.

The global sample order is a pure function of (seed, epoch); optimizer step k consumes global
samples [k*G, (k+1)*G) and data-parallel rank r of D takes its micro-batches from that range. The
state is therefore just the number of consumed samples, which resumes exactly and re-splits for any
other D as long as the global batch G is unchanged.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmtrain.data.dataset import TokenDataset, Window

IGNORE_INDEX = -100


@dataclass
class Batch:
    """One micro-batch: inputs (b, s), targets (b, s) with IGNORE_INDEX where no loss is taken, and
    for document masking RoPE positions (b, s) and a boolean attention mask (b, 1, s, s)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Target tokens that carry loss."""
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(move(self.inputs), move(self.targets), move(self.positions), move(self.attn_mask))


def collate(windows: list[Window], document_mask: bool) -> Batch:
    """Stack windows into a Batch; with document_mask, restart positions and block cross-document attention."""
    toks = torch.from_numpy(np.stack([w.tokens for w in windows]))
    inputs, targets = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
    if not document_mask:
        return Batch(inputs, targets)
    seq = inputs.shape[1]
    doc_ids = torch.zeros(len(windows), seq, dtype=torch.long)
    for b, w in enumerate(windows):
        for s in w.doc_starts[w.doc_starts > 0]:
            if s < seq:
                doc_ids[b, int(s) :] += 1
    idx = torch.arange(seq)
    first = torch.stack([torch.searchsorted(d, d, side="left") for d in doc_ids])
    positions = idx.unsqueeze(0) - first
    same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return Batch(inputs, targets, positions, (same_doc & causal).unsqueeze(1))


class DataLoader:
    """Micro-batches for (dp_rank, dp_size) over one dataset, `state_dict` = consumed samples."""

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        micro_batch_size: int,
        grad_accum: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        document_mask: bool = False,
    ) -> None:
        self.ds, self.mb, self.accum = dataset, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.document_mask = seed, shuffle, document_mask
        self.global_batch = micro_batch_size * grad_accum * dp_size
        self.consumed = 0
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _sample_id(self, g: int) -> int:
        epoch, i = divmod(g, self.ds.num_samples)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.ds.num_samples), epoch
        return int(self._perm[i])

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step; advances the state by one global batch."""
        out = []
        for m in range(self.accum):
            first = self.consumed + (m * self.dp_size + self.dp_rank) * self.mb
            windows = [self.ds[self._sample_id(g)] for g in range(first, first + self.mb)]
            out.append(collate(windows, self.document_mask))
        self.consumed += self.global_batch
        return out

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    @property
    def epoch(self) -> int:
        return self.consumed // self.ds.num_samples

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"data.seed changed from {state['seed']} to {self.seed}: the sample order would differ"
            )
        self.consumed = int(state["consumed"])
