"""HF interop of MoE models: a tiny random MoE checkpoint exported as Mixtral and as Qwen3-MoE loads in
transformers (local files only) with our logits within 1e-5 (fp32); import_hf brings the weights back
bit-exactly, from our export and from transformers' own save_pretrained; what a format cannot express
is refused naming the config key."""

import json
from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint import CheckpointError, CheckpointManager
from llmtrain.checkpoint.convert import export_hf, import_hf
from llmtrain.checkpoint.dcp_io import read_tensors, tensor_shapes
from llmtrain.checkpoint.hf_moe import format_refusals, resolve_format
from llmtrain.checkpoint.state import RankState, TrainerState
from llmtrain.config.io import to_dict
from tests.checkpoint.common import TINY, make_engine
from tests.checkpoint.test_hf import _tool

MOE = [
    *TINY,
    "model.dim=32",
    "model.n_layers=3",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=96",
    "model.moe_num_experts=4",
    "model.moe_top_k=2",
    "model.moe_expert_dim=24",
]
FORMATS = {
    "mixtral": [*MOE, "model.moe_aux_loss_coef=0.01"],
    # a dense first layer, per-head q/k norm, head_dim != dim / n_heads, no top-k renormalisation
    "qwen3_moe": [
        *MOE,
        "model.moe_first_k_dense=1",
        "model.qk_norm=true",
        "model.attn_head_dim=16",
        "model.moe_norm_topk=false",
    ],
}


def _random_checkpoint(cfg, folder: Path):
    """An engine whose every weight is perturbed (norms and q/k norms too, so their permutation is
    tested), saved as a real llmtrain checkpoint."""
    eng = make_engine(cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in eng.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    res = CheckpointManager(folder).save(1, eng, TrainerState(config=to_dict(cfg)), RankState())
    return eng, res.path


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_moe_export_matches_transformers_and_imports_back(fmt, make_config, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    cfg = make_config(*FORMATS[fmt])
    eng, path = _random_checkpoint(cfg, tmp_path / "ck")
    out = export_hf(path, tmp_path / "hf", tokenizer=False)  # auto picks the one exact format
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == fmt
    cls = {"mixtral": transformers.MixtralForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM}[fmt]
    hf, info = cls.from_pretrained(out, dtype=torch.float32, local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = eng.model.eval()(tokens), hf.eval()(tokens).logits
    err = (ours - theirs).abs().max().item()
    assert err < 1e-5 and ours.abs().max() > 0.5, err
    names = sorted(tensor_shapes(path / "model_optim"))
    names = [n for n in names if n.startswith("model.")]
    original = read_tensors(path / "model_optim", names)
    hf.save_pretrained(tmp_path / "resaved")  # transformers' own layout (fused experts or not)
    for i, folder in enumerate((out, tmp_path / "resaved")):
        model = import_hf(folder, tmp_path / f"imported{i}")
        differ = {k: v for k, v in model.items() if getattr(cfg.model, k) != v}
        # Mixtral has no dense layer, so the unused dense width comes back as the expert width
        assert differ == ({"ffn_dim": 24} if fmt == "mixtral" else {}), folder
        back = read_tensors(tmp_path / f"imported{i}" / "model_optim", names)
        for n in names:
            assert torch.equal(original[n], back[n]), (folder.name, n)


def test_moe_formats_refuse_what_they_cannot_express(make_config, tmp_path, capsys):
    tiny = to_dict(make_config("model=moe_tiny"))["model"]  # shared expert, bias balancing, dense layer 0
    why = " ".join(format_refusals(tiny, "mixtral"))
    for key in ("moe_shared_experts", "moe_bias_update_rate", "moe_first_k_dense"):
        assert f"model.{key}" in why, (key, why)
    with pytest.raises(CheckpointError, match="fits neither HF format exactly"):
        resolve_format(tiny, "auto")
    sigmoid = {**to_dict(make_config(*FORMATS["qwen3_moe"]))["model"], "moe_score": "sigmoid"}
    with pytest.raises(CheckpointError, match=r"qwen3_moe: model\.moe_score=sigmoid \(needs softmax\)"):
        resolve_format(sigmoid, "qwen3_moe")
    plain = to_dict(make_config(*FORMATS["mixtral"]))["model"]
    with pytest.raises(CheckpointError, match=r"model\.qk_norm=false: Qwen3-MoE"):
        resolve_format(plain, "qwen3_moe")
    with pytest.raises(CheckpointError, match="LlamaForCausalLM has no experts"):
        resolve_format(plain, "llama")
    # a selection bias that moved (rate set back to 0 after training) is refused from the tensor itself
    eng, path = _random_checkpoint(make_config(*FORMATS["mixtral"]), tmp_path / "ck")
    eng.model.layers["1"].feed_forward.router.expert_bias.fill_(0.5)
    path = (
        CheckpointManager(tmp_path / "ck2")
        .save(1, eng, TrainerState(config=to_dict(eng.cfg)), RankState())
        .path
    )
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.router\.expert_bias is non-zero"):
        export_hf(path, tmp_path / "hf", tokenizer=False)
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
    # the tool: one line naming the key, exit code 2, nothing written
    export_tool = _tool("export_hf")
    assert export_tool([str(tmp_path / "ck"), str(tmp_path / "q"), "--format", "qwen3_moe"]) == 2
    assert "model.qk_norm=false" in capsys.readouterr().err and not (tmp_path / "q").exists()
