"""Supervised fine-tuning data: jsonl prompt/response (or chat) examples -> packed, loss-masked batches.

Each example is tokenized into one token list with a per-token "trained" flag (response tokens and
the EOS that ends them). Its next-token pairs are (t[i], t[i+1]) with the target kept only where
t[i+1] is trained. Examples are packed whole into rows of seq_len pairs; each row carries RoPE
positions that restart at every example and a causal block-diagonal attention mask, so no example
attends to (or is predicted from) another. Rows are packed once (after a seeded shuffle of the
examples) and their order is reshuffled every epoch.

The loader has the Arrow `DataLoader` interface (`next_step`, `state_dict`, `load_state_dict`,
`consumed`): step k consumes global rows [k*G, (k+1)*G) and dp rank r of D takes its micro-batches
from them, so the state is one counter that resumes exactly and re-splits for another D.
"""

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.config.objective import SFTConfig
from llmtrain.data.chat import TEMPLATES
from llmtrain.data.errors import DataError
from llmtrain.data.loader import IGNORE_INDEX, Batch
from llmtrain.data.tokenizer import Tokenizer

log = logging.getLogger("llmtrain")


#: chat template name -> (header before a message, footer after its content)
def render_chat_prompt(messages: list[dict[str, str]], template: str, tok: Tokenizer) -> list[int]:
    """Token ids of `messages` as SFT renders them, followed by the assistant header: the prompt
    a chat-tuned model continues with its reply (tools/generate.py --chat)."""
    header, footer = TEMPLATES[template]
    ids: list[int] = []
    for msg in messages:
        ids += tok.encode(header.format(role=msg["role"])) + tok.encode(msg["content"] + footer)
    return ids + tok.encode(header.format(role="assistant"))


OPEN_BINS = 64
"""Rows kept open while packing: first-fit over the last OPEN_BINS rows is O(n) and near-optimal."""


class SFTDataError(DataError):
    """A malformed SFT data file; the message names the file, line and field (a data error: one line
    and exit code 2 from the launcher or any rank)."""


@dataclass
class Example:
    """One tokenized example: tokens and, per token, whether predicting it carries loss."""

    tokens: list[int]
    trained: list[bool]


def render_example(record: dict[str, Any], cfg: SFTConfig, tok: Tokenizer) -> Example:
    """Tokenize one record: `messages` with the chat template, else prompt + response + EOS."""
    tokens: list[int] = []
    trained: list[bool] = []

    def add(text: str, train: bool) -> None:
        ids = tok.encode(text)
        tokens.extend(ids)
        trained.extend([train] * len(ids))

    if cfg.messages_field in record:
        header, footer = TEMPLATES[cfg.chat_template]
        last_trained = False
        for msg in record[cfg.messages_field]:
            role, content = msg["role"], msg["content"]
            last_trained = role in cfg.train_roles
            add(header.format(role=role), False)
            add(content + footer, last_trained)
        tokens.append(tok.eos_id)
        trained.append(last_trained)
    else:
        add(record[cfg.prompt_field], False)
        add(record[cfg.response_field], True)
        tokens.append(tok.eos_id)
        trained.append(True)
    return Example(tokens, trained)


def load_examples(path: str | Path, cfg: SFTConfig, tok: Tokenizer, seq_len: int) -> list[Example]:
    """Read and tokenize a jsonl file; overlong examples are truncated or dropped per `cfg.overlong`."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"objective.sft: data file {path} does not exist")
    out, dropped, truncated = [], 0, 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = render_example(json.loads(line), cfg, tok)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SFTDataError(
                    f"{path}:{line_no}: expected a JSON object with '{cfg.prompt_field}' and "
                    f"'{cfg.response_field}', or '{cfg.messages_field}' (a list of {{role, content}}): {e!r}"
                ) from e
            if len(ex.tokens) > seq_len + 1:
                if cfg.overlong == "drop":
                    dropped += 1
                    continue
                ex = Example(ex.tokens[: seq_len + 1], ex.trained[: seq_len + 1])
                truncated += 1
            if not any(ex.trained[1:]):  # nothing left to learn (the prompt filled the row)
                dropped += 1
                continue
            out.append(ex)
    if truncated or dropped:
        log.warning(
            "%s: %d examples truncated, %d dropped (longer than data.seq_len + 1 = %d tokens)",
            path,
            truncated,
            dropped,
            seq_len + 1,
        )
    if not out:
        raise SFTDataError(f"{path}: no usable examples (all empty or longer than data.seq_len={seq_len})")
    return out


def pack(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Group example ids into rows of at most `capacity` pairs (an example of n tokens has n - 1):
    seeded shuffle, then first fit over the most recent OPEN_BINS rows."""
    order = np.random.default_rng([seed, 7]).permutation(len(lengths))
    rows: list[list[int]] = []
    free: list[int] = []
    first_open = 0
    for i in order.tolist():
        need = lengths[i] - 1
        for r in range(first_open, len(rows)):
            if free[r] >= need:
                rows[r].append(i)
                free[r] -= need
                break
        else:
            rows.append([i])
            free.append(capacity - need)
            first_open = max(first_open, len(rows) - OPEN_BINS)
    return rows


def collate_rows(rows: list[list[Example]], seq_len: int, pad_id: int) -> Batch:
    """Concatenate each row's examples into (inputs, targets, positions, causal block-diagonal mask)."""
    bsz = len(rows)
    inputs = torch.full((bsz, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((bsz, seq_len), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((bsz, seq_len), dtype=torch.long)
    doc = torch.zeros((bsz, seq_len), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for d, ex in enumerate(row, 1):
            t = torch.tensor(ex.tokens)
            keep = torch.tensor(ex.trained[1:])
            n = len(ex.tokens) - 1
            inputs[b, at : at + n] = t[:-1]
            targets[b, at : at + n] = torch.where(keep, t[1:], IGNORE_INDEX)
            positions[b, at : at + n] = torch.arange(n)
            doc[b, at : at + n] = d
            at += n
        positions[b, at:] = torch.arange(seq_len - at)  # padding: its own causal "document" (id 0)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    mask = (doc.unsqueeze(-1) == doc.unsqueeze(-2)) & causal
    return Batch(inputs, targets, positions, mask.unsqueeze(1))


class SFTLoader:
    """Packed SFT micro-batches for (dp_rank, dp_size); state = consumed rows (see module docstring)."""

    def __init__(
        self,
        examples: list[Example],
        *,
        seq_len: int,
        pad_id: int,
        micro_batch_size: int,
        grad_accum: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        wrap: bool = True,
    ) -> None:
        """`wrap=False` (validation): steps past the last packed row get padding-only rows that carry
        no loss, so a val set smaller than trainer.val_batches x the global micro-batch scores each
        row exactly once instead of wrapping around to score some twice."""
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.rows = pack([len(e.tokens) for e in examples], seq_len, seed)
        self.mb, self.accum, self.dp_rank, self.dp_size = micro_batch_size, grad_accum, dp_rank, dp_size
        self.seed, self.shuffle, self.wrap = seed, shuffle, wrap
        self.global_batch = micro_batch_size * grad_accum * dp_size
        self.consumed = 0
        self._perm_epoch, self._perm = -1, np.arange(0)

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    def _row(self, g: int) -> list[Example]:
        epoch, i = divmod(g, len(self.rows))
        if epoch and not self.wrap:
            return []  # a padding-only row (collate_rows): no target tokens
        if self.shuffle:
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
                self._perm_epoch = epoch
            i = int(self._perm[i])
        return [self.examples[j] for j in self.rows[i]]

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step; advances by one global batch."""
        out = []
        for m in range(self.accum):
            first = self.consumed + (m * self.dp_size + self.dp_rank) * self.mb
            out.append(
                collate_rows([self._row(g) for g in range(first, first + self.mb)], self.seq_len, self.pad_id)
            )
        self.consumed += self.global_batch
        return out

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    @property
    def epoch(self) -> int:
        return self.consumed // len(self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "num_rows": len(self.rows),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("num_rows", len(self.rows)) != len(
            self.rows
        ):
            raise ValueError(
                f"SFT data changed since the checkpoint (seed {state.get('seed')} -> {self.seed}, packed rows "
                f"{state.get('num_rows')} -> {len(self.rows)}): objective.sft.train_path, data.seq_len and "
                "data.seed must stay the same to resume"
            )
        self.consumed = int(state["consumed"])
