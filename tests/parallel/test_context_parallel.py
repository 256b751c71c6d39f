"""Context parallelism (`parallel.cp`, llmtrain/parallel/context_parallel.py) trains like one process.

Tiny model at seq 1024, 4 steps on real Shakespeare batches, fp32, gloo: cp2 (with and without packed
document masks) and checkpoints across cp2 <-> cp1 in one 2-rank spawn, cp2 x dp2 and cp2 x tp2 in
one 4-rank spawn; each checked against the 1-process run (loss, grad norm, evaluation, weights).
"""

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmtrain
from llmtrain.config import ConfigError
from llmtrain.data.loader import Batch
from llmtrain.parallel.context_parallel import (
    causal_chunks_attention,
    chunk_index,
    gathered_index,
    shard_batch,
)
from tests.distributed import run_distributed
from tests.parallel.common import load_state, make_cfg, rel_err, train_layout

STEPS, SAVE_AT = 4, 2
RTOL, WEIGHT_ATOL = 1e-5, 3e-5  # as tests/parallel/test_parity.py
LONG = ["data.seq_len=1024", "model.max_seq_len=1024", "trainer.global_batch_size=4"]
DOCS = ["data.document_mask=true"]
LAYOUTS_2 = {
    "cp2": ["parallel=cp2"],
    "cp2_docs": ["parallel=cp2", *DOCS],
    "cp2_zero3": ["parallel=zero3", "parallel.cp=2"],  # FSDP2 over the flattened dp_shard x cp mesh
}
LAYOUTS_4 = {
    "cp2_dp2": ["parallel=cp2"],
    "cp2_tp2": ["parallel=cp2", "parallel.tp=2"],
    "cp2_pp2": ["parallel=cp2", "parallel.pp=2"],
    "cp2_zero2_dp2": ["parallel=zero2", "parallel.cp=2"],
}


def test_chunks_cover_the_sequence_and_balance_causal_work() -> None:
    for cp in (1, 2, 4):
        s = 16 * cp
        idx = [chunk_index(s, cp, r) for r in range(cp)]
        assert torch.equal(torch.sort(torch.cat(idx)).values, torch.arange(s))
        assert torch.equal(gathered_index(s, cp), torch.cat(idx))
        work = {int((i + 1).sum()) for i in idx}  # keys visible to each query, summed per rank
        assert len(work) == 1, f"cp={cp}: causal work per rank differs: {work}"
    assert chunk_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert chunk_index(8, 2, 1).tolist() == [2, 3, 4, 5]


def test_shard_batch_keeps_global_positions_and_document_mask() -> None:
    s, cp = 8, 2
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = (causal & (doc.unsqueeze(-1) == doc.unsqueeze(-2))).unsqueeze(1)
    batch = Batch(torch.arange(s).unsqueeze(0), torch.arange(s).unsqueeze(0) + 100, pos, mask)
    for rank in range(cp):
        part, idx = shard_batch(batch, cp, rank), chunk_index(s, cp, rank)
        keys = gathered_index(s, cp)
        assert part.inputs.tolist() == [idx.tolist()] and part.targets.tolist() == [(idx + 100).tolist()]
        assert part.positions.tolist() == [pos[0, idx].tolist()]
        assert torch.equal(part.attn_mask[0, 0], mask[0, 0][idx][:, keys])
    plain = shard_batch(Batch(batch.inputs, batch.targets), cp, 1)
    assert plain.positions.tolist() == [[2, 3, 4, 5]] and plain.attn_mask is None


def test_chunk_attention_equals_causal_sdpa_with_linear_memory() -> None:
    """The mask-free path (two flash blocks merged by log-sum-exp, ring-attention backward): outputs
    and q/k/v gradients of all cp ranks together equal one causal SDPA, and at 8k tokens the step
    allocates less than the (2c, S) float mask alone would."""
    from llmtrain.plan.measure import PeakTensorMemory

    torch.manual_seed(0)
    s, cp = 96, 3
    q, k, v = (torch.randn(2, 4, s, 8, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), g)
    got = [torch.zeros_like(t) for t in (q, k, v)]
    keys = gathered_index(s, cp)
    for rank in range(cp):
        idx = chunk_index(s, cp, rank)
        parts = [q.detach()[:, :, idx], k.detach()[:, :, keys], v.detach()[:, :, keys]]
        parts = [t.requires_grad_() for t in parts]
        out = causal_chunks_attention(*parts, cp, rank)
        assert (out - ref[:, :, idx]).abs().max() < 1e-6
        last = torch.autograd.grad(out, parts, g[:, :, idx])  # rank cp - 1's, kept for bf16 below
        for acc, at, grad in zip(got, (idx, keys, keys), last):
            acc[:, :, at] += grad
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) < 1e-5
    # bf16 (what autocast hands attention): the merge runs in fp32 and the output stays bf16, so the
    # flash backward gets one dtype (it raised "expected scalar type BFloat16 but found Float")
    qb, kb, vb = (
        t.detach().bfloat16()[:, :, ix].requires_grad_() for t, ix in zip((q, k, v), (idx, keys, keys))
    )
    out = causal_chunks_attention(qb, kb, vb, cp, cp - 1)
    assert out.dtype == torch.bfloat16 and (out.float() - ref[:, :, idx]).abs().max() < 3e-2
    grads = torch.autograd.grad(out, (qb, kb, vb), g[:, :, idx].bfloat16())
    assert all(t.dtype == torch.bfloat16 for t in grads)
    assert max((a.float() - b).abs().max().item() for a, b in zip(grads, last)) < 5e-2
    s = 8192
    q = torch.randn(1, 4, s // 2, 16, requires_grad=True)
    k, v = (torch.randn(1, 4, s, 16, requires_grad=True) for _ in range(2))
    with PeakTensorMemory() as mem:
        causal_chunks_attention(q, k, v, 2, 0).sum().backward()
    assert mem.peak < (s // 2) * s * 4 / 4, f"{mem.peak / 2**20:.0f} MiB"


def test_config_errors_name_the_keys(make_config) -> None:
    with pytest.raises(ConfigError, match=r"data.seq_len=102 must be divisible by 2 x parallel.cp = 4"):
        make_config("parallel=cp2", "data.seq_len=102")
    with pytest.raises(ConfigError, match=r"parallel.backend=deepspeed .*TEDotProductAttention"):
        make_config("parallel=cp2", "parallel.backend=deepspeed")
    with pytest.raises(ConfigError, match=r"parallel.backend=megatron"):
        make_config("parallel=cp2", "parallel.backend=megatron")
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=3 .*HSDP"):
        make_config("parallel=hsdp", "parallel.cp=2")
    with pytest.raises(ConfigError, match=r"objective.name=masked_lm"):
        make_config("parallel=cp2", "objective=masked_lm")
    from llmtrain.parallel.layout import build_dims

    cfg = make_config("parallel.dp_replicate=1", "parallel.cp=2", "parallel.tp=2")
    with pytest.raises(ConfigError, match=r"dp_replicate=1 x dp_shard=1 x cp=2 x tp=2 x pp=1 must equal 2"):
        build_dims(cfg, 2)
    assert build_dims(make_config("parallel=cp2"), 8).dp == 4


def _spawned(rank: int, world: int, data: str, docs: str, root: str, table: dict[str, list[str]]) -> dict:
    """The layouts of `table` in sequence; on 2 ranks also the checkpoints cp2 -> (test) and cp1 -> cp2."""
    out = {}
    for name, extra in table.items():
        cfg = make_cfg(docs if "docs" in name else data, root, [*LONG, *extra])
        out[name] = train_layout(cfg, world, rank, STEPS, want_state=Path(root) / f"{name}.pt")
    if world == 2:
        cfg = make_cfg(data, root, [*LONG, "parallel=cp2"])
        train_layout(cfg, 2, rank, SAVE_AT, save=Path(root) / "ckpt_cp2")
        out["cp1_to_cp2"] = train_layout(
            cfg, 2, rank, STEPS - SAVE_AT, skip=SAVE_AT, load=Path(root) / "ckpt_cp1"
        )
    return out


@pytest.fixture(scope="module")
def paragraphs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Short documents (the paragraphs of two plays, mostly 20-500 bytes), so that a 1024-token
    sequence packs many and document masks cut inside and across the cp chunks (a play is ~100 KB,
    so the plain corpus has almost no boundary in a 1024-token window)."""
    from llmtrain.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("paragraphs")
    with gzip.open(Path(llmtrain.__file__).parent / "assets" / "shakespeare.jsonl.gz", "rt") as f:
        plays = [json.loads(line)["text"] for _, line in zip(range(2), f)]
    paras = [p for play in plays for p in play.split("\n\n") if len(p) > 20]
    raw = root / "paragraphs.jsonl"
    raw.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    prepare_dataset(raw, root / "data", "byte", val_fraction=0.05)
    return root / "data"


@pytest.fixture(scope="module")
def references(
    shakespeare_dir: Path, paragraphs_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, Path]:
    """1-process runs (plain, and document-masked on the paragraphs) and a cp1 checkpoint after
    SAVE_AT steps."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cp")
    data = str(shakespeare_dir)
    refs = {
        name: train_layout(
            make_cfg(d, str(root), [*LONG, *extra]), 1, 0, STEPS, want_state=root / f"ref_{name}.pt"
        )
        for name, d, extra in (("plain", data, []), ("docs", str(paragraphs_dir), DOCS))
    }
    train_layout(make_cfg(data, str(root), LONG), 1, 0, SAVE_AT, save=root / "ckpt_cp1")
    return refs, root


@pytest.fixture(scope="module")
def runs(references: tuple[dict, Path], shakespeare_dir: Path, paragraphs_dir: Path) -> dict:
    root = references[1]
    args = (str(shakespeare_dir), str(paragraphs_dir), str(root))
    two = run_distributed(_spawned, 2, args=(*args, LAYOUTS_2), timeout=240)[0]
    four = run_distributed(_spawned, 4, args=(*args, LAYOUTS_4), timeout=240)[0]
    return {**two, **four}


def _check(name: str, run: dict, ref: dict, first: int = 0) -> None:
    errs = [rel_err(run[k], ref[k][first:]) for k in ("loss", "grad_norm")] + [
        rel_err(run["eval"], ref["eval"])
    ]
    print(f"{name}: loss {errs[0]:.1e} grad norm {errs[1]:.1e} eval {errs[2]:.1e}", end="")
    assert max(errs) <= RTOL, (name, run, ref)
    if "state" in run:
        got, want = load_state(run["state"]), load_state(ref["state"])
        assert sorted(got) == sorted(want)
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        print(f" weights {worst:.1e}", end="")
        assert worst <= WEIGHT_ATOL, (name, worst)
    print()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_cp_layouts_match_single_process(
    runs: dict, references: tuple[dict, Path], shakespeare_dir: Path
) -> None:
    refs, root = references
    for name in (*LAYOUTS_2, *LAYOUTS_4):
        _check(name, runs[name], refs["docs" if "docs" in name else "plain"])
    _check("cp1 -> cp2", runs["cp1_to_cp2"], refs["plain"], first=SAVE_AT)
    cfg = make_cfg(str(shakespeare_dir), str(root), LONG)
    back = train_layout(
        cfg, 1, 0, STEPS - SAVE_AT, skip=SAVE_AT, load=root / "ckpt_cp2", want_state=root / "b.pt"
    )
    _check("cp2 -> cp1", back, refs["plain"], first=SAVE_AT)
