"""Shared pieces of the checkpoint tests: a tiny model config, a one-process engine, a training step."""

import torch

from llmtrain.data.loader import Batch

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn_dim=64",
    "data.seq_len=32",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=4",
    "trainer.log_every=4",
    "trainer.val_every=0",
    "trainer.num_threads=1",
    "optim.warmup_steps=2",
]


def make_engine(cfg):
    """The native engine of `cfg` on one CPU process (no process group)."""
    from llmtrain.parallel import ParallelDims
    from llmtrain.parallel.build import build_engine

    return build_engine(cfg, ParallelDims(1, 1, 1, 1, 1), None, torch.device("cpu"))


def step(engine, seed: int = 0, vocab: int = 256) -> float:
    """One optimizer step on random tokens (fills the AdamW state); returns the loss."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (2, 17), generator=g)
    return engine.train_step([Batch(toks[:, :-1], toks[:, 1:].clone())], 1e-3).loss


def snapshot(engine) -> dict[str, torch.Tensor]:
    """Model parameters and optimizer moments, cloned (names from the module and param order)."""
    out = {f"p.{k}": v.detach().clone() for k, v in engine.model.state_dict().items()}
    for i, st in enumerate(engine.optimizer.state.values()):
        out.update({f"o.{i}.{k}": v.detach().clone() for k, v in st.items() if torch.is_tensor(v)})
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
