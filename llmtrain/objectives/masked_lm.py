"""BERT-style masked language modelling as a transform of ordinary packed batches.

The Arrow loader yields next-token pairs (inputs, targets = inputs shifted by one). Masked LM instead
predicts selected positions of `inputs` itself with bidirectional attention: a share `mask_prob` of
the positions is selected; of those 80% become the mask token, 10% a random token and 10% stay as
they are (the 80/10/10 rule of Devlin et al.); targets are the original tokens at the selected
positions and IGNORE_INDEX everywhere else, so the token-weighted loss in `train_step` counts exactly
the selected positions.

Evaluation (`evaluate_masked`, used by tools/evaluate.py) reports the masked-token accuracy next to
the loss, and the token count is that of the selected positions, not of the whole window.

Randomness is keyed by (objective.seed, step, row of the global batch), not by rank: row k of step s
is the same sample whatever the data-parallel size or accumulation split, so it gets the same mask,
and DDP runs reproduce the single-process run.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from llmtrain.config.objective import MaskedLMConfig
from llmtrain.data.loader import IGNORE_INDEX, Batch
from llmtrain.distributed.collectives import all_reduce_

EVAL_STREAM, TRAIN_STREAM = 0, 1


@dataclass
class BidirectionalBatch(Batch):
    """A Batch whose attention is not causal (the model forward is called with causal=False)."""

    causal: bool = False

    def to(self, device: torch.device) -> "BidirectionalBatch":
        moved = {
            f.name: (
                v.to(device, non_blocking=True) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
            )
            for f in fields(self)
        }
        return BidirectionalBatch(**moved)


def bidirectional_doc_mask(positions: torch.Tensor) -> torch.Tensor:
    """(b, 1, s, s) mask letting every token see its whole document (documents start where the
    RoPE position restarts at 0) and nothing of its neighbours in the packed row."""
    doc = (positions == 0).long().cumsum(dim=1)
    return (doc.unsqueeze(-1) == doc.unsqueeze(-2)).unsqueeze(1)


class MaskedLMTransform:
    """Turns each micro-batch of the step into a masked-LM batch (see the module docstring)."""

    def __init__(
        self,
        cfg: MaskedLMConfig,
        *,
        seed: int,
        mask_token_id: int,
        num_random_tokens: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        pad_id: int | None = None,
    ) -> None:
        self.cfg, self.seed = cfg, seed
        self.mask_token_id, self.num_random_tokens = mask_token_id, num_random_tokens
        self.dp_rank, self.dp_size, self.pad_id = dp_rank, dp_size, pad_id

    def __call__(self, batches: list[Batch], step: int | None) -> list[Batch]:
        """Mask this rank's micro-batches of optimizer step `step` (None: the fixed validation masks)."""
        return [self.mask(b, step, m) for m, b in enumerate(batches)]

    def mask(self, batch: Batch, step: int | None, micro: int) -> BidirectionalBatch:
        """Mask one micro-batch; `micro` is its index within this rank's step (to locate its rows)."""
        tokens = batch.inputs
        bsz, seq = tokens.shape
        first_row = (micro * self.dp_size + self.dp_rank) * bsz
        stream = [EVAL_STREAM, 0] if step is None else [TRAIN_STREAM, step]
        draws = np.stack([self._row_draws(stream, first_row + i, seq) for i in range(bsz)])
        select_u, action_u, rand_tok = (torch.from_numpy(draws[:, j]).to(tokens.device) for j in range(3))
        c = self.cfg
        selected = select_u < c.mask_prob
        if self.pad_id is not None:
            selected &= tokens != self.pad_id
        to_mask = selected & (action_u < c.mask_token_prob)
        to_random = (
            selected & (action_u >= c.mask_token_prob) & (action_u < c.mask_token_prob + c.random_token_prob)
        )
        inputs = torch.where(to_mask, torch.full_like(tokens, self.mask_token_id), tokens)
        inputs = torch.where(to_random, rand_tok.to(tokens.dtype), inputs)
        targets = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
        attn_mask = None if batch.positions is None else bidirectional_doc_mask(batch.positions)
        return BidirectionalBatch(inputs, targets, batch.positions, attn_mask)

    def _row_draws(self, stream: list[int], row: int, seq: int) -> np.ndarray:
        """(3, seq) draws for one row: selection uniform, action uniform, random replacement token."""
        rng = np.random.default_rng([self.seed, *stream, row])
        u = rng.random((2, seq))
        tok = rng.integers(0, self.num_random_tokens, seq)
        return np.concatenate([u, tok[None].astype(np.float64)])


class CountCorrect:
    """An engine loss function that also counts the target tokens whose argmax prediction is right:
    the masked-token accuracy of a masked-LM evaluation, from the very forward that gives the loss."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self.correct = torch.zeros((), dtype=torch.float64)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        keep = targets != IGNORE_INDEX
        self.correct += (logits.argmax(-1)[keep] == targets[keep]).sum().double().cpu()
        return self.loss_fn(logits, targets)


def evaluate_masked(engine: Any, batches: list[Batch]) -> tuple[float, float | None]:
    """(mean loss, accuracy) on masked batches over all data-parallel ranks; accuracy is None for an
    engine without a pluggable loss. `batches` are already masked (`MaskedLMTransform`)."""
    original = engine.loss_fn
    if original is None:
        return engine.evaluate(batches), None
    counter = CountCorrect(original)
    engine.replace_loss(counter)
    try:
        loss = engine.evaluate(batches)
    finally:
        engine.replace_loss(original)
    group = getattr(engine, "dp_group", None)
    totals = torch.stack([counter.correct, torch.tensor(float(sum(b.num_tokens for b in batches)))]).double()
    all_reduce_(totals, group)
    return loss, float(totals[0] / totals[1].clamp(min=1))
