"""Hugging Face interop: exported checkpoints load in transformers' LlamaForCausalLM with our logits;
import_hf brings the weights back bit-exactly; the RoPE row permutation is its own inverse pair."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint import CheckpointError, CheckpointManager
from llmtrain.checkpoint.convert import import_hf
from llmtrain.checkpoint.dcp_io import read_tensors, tensor_shapes
from llmtrain.checkpoint.hf import halves_to_interleaved, interleaved_to_halves, load_hf, save_hf
from llmtrain.checkpoint.policy import check_model_matches
from llmtrain.checkpoint.state import RankState, TrainerState
from tests.checkpoint.common import TINY, make_engine, step

ROOT = Path(__file__).resolve().parents[2]
GQA = [*TINY, "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=96"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(params=[[], ["model.attn_head_dim=8"]], ids=["head_dim_16", "head_dim_8"])
def trained(make_config, tmp_path, request):
    """A real llmtrain checkpoint of a GQA model after two optimizer steps, and its engine; also with
    heads narrower than dim / n_heads (config.json's head_dim: it was written as dim / n_heads)."""
    torch.set_num_threads(1)
    cfg = make_config(*GQA, *request.param)
    eng = make_engine(cfg)
    step(eng), step(eng, seed=1)
    from llmtrain.config.io import to_dict

    res = CheckpointManager(tmp_path / "ck").save(2, eng, TrainerState(config=to_dict(cfg)), RankState())
    return cfg, eng, res.path


def test_rope_permutation_round_trip():
    w = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)  # 2 heads of head_dim 4
    h = interleaved_to_halves(w, 2)
    assert h[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # per head: rows 0,2 | 1,3
    assert torch.equal(halves_to_interleaved(h, 2), w)


def test_export_loads_in_transformers_with_the_same_logits(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, eng, path = trained
    assert _tool("export_hf")([str(path.parent.parent / "ck"), str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = eng.model(tokens), hf(tokens).logits
    err = (ours - theirs).abs().max().item()
    assert err < 2e-5, err
    assert ours.abs().max() > 0.1  # the comparison is not between two zero tensors
    # the run's tokenizer (built-in byte level) comes along: same ids, same special tokens
    from llmtrain.data.tokenizer import ByteTokenizer

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "To be, or not  to be:\n\tthat is the quéstion 🙂"
    assert tok.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
    assert tok.decode(ByteTokenizer().encode(text)) == text
    assert (
        (tok.eos_token_id, tok.pad_token_id) == (256, 257) == (hf.config.eos_token_id, hf.config.pad_token_id)
    )


def test_import_round_trip_and_init_from(trained, tmp_path, make_config):
    cfg, eng, path = trained
    out = tmp_path / "hf"
    assert _tool("export_hf")([str(path), str(out), "--max-shard-gb", "0.0001"]) == 0  # ~107 kB shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and len(index["weight_map"]) == 2 * 9 + 3
    model = import_hf(out, tmp_path / "imported")
    check_model_matches({"model": model}, cfg.model, out)
    names = sorted(tensor_shapes(path / "model_optim"))
    original = read_tensors(path / "model_optim", names)
    back = read_tensors(tmp_path / "imported" / "model_optim", names)
    for n in names:
        assert torch.equal(original[n], back[n]), n
    fresh = make_engine(cfg)
    CheckpointManager(tmp_path / "x").load(tmp_path / "imported", fresh, load_optimizer=False)
    for (n, a), b in zip(eng.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_sharded_export_and_bad_hf_folders(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(4)}
    files = save_hf(tmp_path / "s", tensors, {"model_type": "llama"}, max_shard_bytes=2048)
    assert len(files) == 2 and (tmp_path / "s" / "model.safetensors.index.json").is_file()
    got, _ = load_hf(tmp_path / "s")
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        import_hf(tmp_path / "nothing", tmp_path / "o1")
    (tmp_path / "s" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="supported: llama, mixtral"):
        import_hf(tmp_path / "s", tmp_path / "o2")
    (tmp_path / "s" / "model-00002-of-00002.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: unreadable"):
        load_hf(tmp_path / "s")


@pytest.mark.parametrize("name", ["sentencepiece-32k", "bert-wordpiece"])
def test_exported_pretrained_tokenizers_encode_like_ours(name, tmp_path):
    """A real sentencepiece model and a real tokenizer.json, exported as export_hf does: HF's
    AutoTokenizer must give the ids we trained on. For sentencepiece, HF's conversion is approximate
    (llmtrain/checkpoint/hf_tokenizer.py): every probe and >= 97% of random Shakespeare snippets encode
    identically (measured 98.4%), and every decoding is identical."""
    import gzip
    import random

    transformers = pytest.importorskip("transformers")
    from llmtrain.checkpoint.hf_tokenizer import PROBES, export_tokenizer
    from llmtrain.data.tokenizer import bundled_tokenizer_files, load_tokenizer

    path = bundled_tokenizer_files().get(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/setup.d/tokenizers.sh installs it)")
    what, ids = export_tokenizer(str(path), tmp_path, 512)
    ours, theirs = load_tokenizer(str(path)), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ids["eos_token_id"] == ours.eos_id == theirs.eos_token_id, what
    with gzip.open(ROOT / "llmtrain/assets/shakespeare.jsonl.gz", "rt") as f:
        text = "\n".join(json.loads(line)["text"] for line in f)
    rng = random.Random(0)
    snippets = [
        text[i : i + rng.randrange(1, 300)] for i in (rng.randrange(len(text) - 300) for _ in range(300))
    ]
    for s in PROBES:
        assert theirs.encode(s, add_special_tokens=False) == ours.encode(s), (what, s)
    same = sum(theirs.encode(s, add_special_tokens=False) == ours.encode(s) for s in snippets)
    assert same >= (0.97 if name.startswith("sentencepiece") else 1.0) * len(snippets), (what, same)
    if name.startswith("sentencepiece"):  # WordPiece decoding is lossy by design (case, spacing)
        assert all(theirs.decode(ours.encode(s)) == ours.decode(ours.encode(s)) for s in snippets)
