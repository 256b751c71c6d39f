"""Using a trained checkpoint: rebuild its model under a layout, evaluate it, sample from it.

`load_checkpoint_engine` builds the engine exactly as training does (so any parallel layout, and LoRA
adapters on their base, load through DCP) with the checkpoint's own resolved config, optionally
overridden. The tools `tools/evaluate.py` and `tools/generate.py` are thin command lines over this.
"""

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.checkpoint.dcp_io import single_process_dcp
from llmtrain.checkpoint.folder import ENGINE_DIR, resolve_checkpoint_path
from llmtrain.checkpoint.pin import base_of
from llmtrain.checkpoint.state import TrainerState
from llmtrain.config import Config, ConfigError
from llmtrain.data.dataset import TokenDataset
from llmtrain.data.loader import DataLoader
from llmtrain.distributed.env import DistEnv, init_distributed, pick_device
from llmtrain.parallel import ParallelDims
from llmtrain.parallel.build import build_engine
from llmtrain.parallel.engine import Engine
from llmtrain.parallel.step import global_tokens
from llmtrain.peft import base_checkpoint, build_peft

log = logging.getLogger("llmtrain")


@dataclasses.dataclass
class LoadedCheckpoint:
    """An engine holding a checkpoint's weights, with the config and trainer state it was saved with."""

    path: Path
    cfg: Config
    state: TrainerState
    engine: Engine
    dims: ParallelDims
    device: torch.device

    @property
    def model(self) -> nn.Module:
        return self.engine.modules[0]


def load_checkpoint_engine(
    path: str | Path, env: DistEnv, *, device: str = "auto", **sections: Any
) -> LoadedCheckpoint:
    """Collective: build the checkpoint's model (layout = data parallel over env.world_size unless
    `parallel=` is given) and load its weights. `sections` replace config sections (e.g. data=...)."""
    ckpt = resolve_checkpoint_path(path, key="checkpoint")
    state = TrainerState.read(ckpt)
    cfg = state.run_config()
    parallel = sections.pop("parallel", None) or dataclasses.replace(
        cfg.parallel, dp_replicate=-1, dp_shard=1, tp=1, pp=1, ep=1, zero_stage=0
    )
    trainer = dataclasses.replace(cfg.trainer, device=device)
    cfg = dataclasses.replace(cfg, parallel=parallel, trainer=trainer, **sections)
    dev = pick_device(device, env.local_rank)
    init_distributed(env, dev)
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, env.world_size, ep=p.ep, cp=p.cp)
    mesh = dims.build_mesh(dev.type) if env.world_size > 1 else None
    with single_process_dcp():
        engine = build_engine(cfg, dims, mesh, dev, build_peft(cfg))
        if base_checkpoint(cfg) is not None:  # adapters-only LoRA checkpoint: its pinned frozen base first
            base = base_of(state.init_from, state.config, ckpt)
            assert base is not None
            engine.load(base / ENGINE_DIR, load_optimizer=False)
        engine.load(ckpt / ENGINE_DIR, load_optimizer=False)
    return LoadedCheckpoint(ckpt, cfg, state, engine, dims, dev)


def evaluate_checkpoint(
    loaded: LoadedCheckpoint, data_path: str | Path, *, env: DistEnv, num_batches: int, micro_batch_size: int
) -> dict[str, float]:
    """Mean token loss and perplexity on held-out Arrow data, each dp rank reading its own part.

    The checkpoint's objective applies (a masked-LM checkpoint is scored on its fixed validation
    masks); `num_batches` micro-batches per rank, unshuffled, from the start of the data."""
    from llmtrain.objectives import MaskedLM, Objective

    cfg, dims = loaded.cfg, loaded.dims
    dp_rank = dims.coords(env.rank)["dp"]
    # a masked-LM model is scored on masked tokens; every other objective on next-token cross-entropy
    masked = cfg.objective.name == "masked_lm"
    objective = MaskedLM(cfg, dp_rank, dims.dp) if masked else Objective(cfg, dp_rank, dims.dp)
    extra: dict[str, float] = {}
    if is_sft_file(data_path):
        loader, extra = _sft_loader(cfg, data_path, micro_batch_size, dp_rank, dims.dp, num_batches)
        num_batches = int(extra["batches_per_rank"])
    else:
        ds = TokenDataset(str(data_path), cfg.data.seq_len, packing=cfg.data.packing)
        loader = DataLoader(
            ds,
            micro_batch_size=micro_batch_size,
            grad_accum=1,
            dp_rank=dp_rank,
            dp_size=dims.dp,
            shuffle=False,
            document_mask=cfg.data.document_mask,
        )
    batches = objective.prepare(
        [b.to(loaded.device) for _ in range(num_batches) for b in loader.next_step()], None
    )
    if masked:  # scored: the masked positions only; and how many of them the model gets right
        from llmtrain.objectives.masked_lm import evaluate_masked

        loss, accuracy = evaluate_masked(loaded.engine, batches)
        extra |= {"masked_accuracy": accuracy} if accuracy is not None else {}
    else:
        loss = loaded.engine.evaluate(batches)
    tokens = global_tokens(batches, getattr(loaded.engine, "dp_group", None))
    return {"loss": loss, "ppl": float(torch.tensor(loss).exp()), "tokens": float(tokens), **extra}


def is_sft_file(path: str | Path) -> bool:
    """A prompt/response (or chat) jsonl file rather than a tokenized Arrow folder."""
    return str(path).endswith((".jsonl", ".jsonl.gz", ".json"))


def _sft_loader(cfg, path, micro_batch_size: int, dp_rank: int, dp_size: int, num_batches: int):
    """Held-out SFT examples, rendered and packed exactly as training does (loss on responses only),
    read in order without repeats: as many whole steps of micro_batch_size x dp rows as the file
    fills, at most num_batches per rank; the few rows of an incomplete last step are reported unused."""
    from llmtrain.data.tokenizer import load_tokenizer
    from llmtrain.objectives.sft_data import SFTLoader, load_examples

    tok = load_tokenizer(cfg.data.tokenizer)
    examples = load_examples(path, cfg.objective.sft, tok, cfg.data.seq_len)
    loader = SFTLoader(
        examples,
        seq_len=cfg.data.seq_len,
        pad_id=tok.pad_id,
        micro_batch_size=micro_batch_size,
        grad_accum=1,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.data.seed,
        shuffle=False,
    )
    steps = min(num_batches, loader.num_samples // (micro_batch_size * dp_size))
    if steps == 0:
        raise ConfigError(
            f"{path}: {len(examples)} examples pack into {loader.num_samples} rows, fewer than one step of "
            f"micro_batch_size={micro_batch_size} x {dp_size} rank(s); lower --micro-batch-size"
        )
    used = steps * micro_batch_size * dp_size
    stats = {
        "batches_per_rank": float(steps),
        "rows": float(used),
        "rows_unused": float(loader.num_samples - used),
    }
    return loader, stats


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    *,
    max_new_tokens: int,
    max_seq_len: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Continue `prompt`: greedy when temperature == 0, else nucleus (top-p) sampling at temperature.

    No KV cache: the whole window is re-run per token, which is fine for a quick look at a small
    model and keeps the model code free of inference state."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt)
    model.eval()
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-max_seq_len:]], device=device)
        logits = model(window)[0, -1].float().cpu()
        nxt = int(logits.argmax()) if temperature <= 0 else sample_top_p(logits / temperature, top_p, gen)
        ids.append(nxt)
        if nxt == eos_id:
            break
    return ids[len(prompt) :]


def sample_top_p(logits: torch.Tensor, top_p: float, gen: torch.Generator) -> int:
    """Sample from the smallest set of tokens whose probabilities sum to at least top_p."""
    probs = F.softmax(logits, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[choice])


__all__ = ["LoadedCheckpoint", "evaluate_checkpoint", "generate", "load_checkpoint_engine"]
