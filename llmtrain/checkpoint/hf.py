"""Hugging Face Llama interop: parameter names, the RoPE row permutation, config.json, safetensors.

Our attention rotates interleaved pairs (x[2i], x[2i+1]) (Meta's layout); HF's LlamaAttention rotates
halves (x[i], x[i + d/2]) (`rotate_half`). Both give the same attention scores if the rows of wq/wk
inside each head are reordered: HF row j < d/2 is our row 2j, HF row d/2 + j is our row 2j + 1. That
is the permutation HF's own `convert_llama_weights_to_hf.py` applies; `to_hf`/`from_hf` do it and its
inverse (and to the per-head q/k norm weights of Qwen3-style attention). Mixture-of-experts models
go to the Mixtral or Qwen3-MoE format (llmtrain/checkpoint/hf_moe.py). Everything is written as
safetensors + JSON, never pickle.
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmtrain.checkpoint.folder import CheckpointError
from llmtrain.checkpoint.hf_moe import (
    MOE_FORMATS,
    moe_hf_config,
    moe_model_config_from_hf,
    moe_tensors_from_hf,
    moe_tensors_to_hf,
)
from llmtrain.paths import honour_umask

_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of each head from (x0, x1, x2, x3, ...) pairs to (x0, x2, ... | x1, x3, ...)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_halves`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    _, idx, rest = name.split(".", 2)  # layers.<i>.<rest>
    return f"model.layers.{idx}.{_LAYER[rest]}"


def _norm_to_halves(w: torch.Tensor) -> torch.Tensor:
    """A per-head q/k norm weight (head_dim,) in the rotate-half order of its q/k rows."""
    return interleaved_to_halves(w.view(-1, 1), 1).view(-1)


def to_hf(
    state: dict[str, torch.Tensor], model: dict[str, Any], fmt: str = "llama"
) -> dict[str, torch.Tensor]:
    """Our full state dict -> HF names and q/k row order of `fmt` (llama, or an MoE format of
    llmtrain.checkpoint.hf_moe; model = config['model'])."""
    kv = model.get("n_kv_heads") or model["n_heads"]
    out = {}
    for name, t in state.items():
        if name == "output.weight" and model.get("tie_embeddings"):
            continue
        moe = moe_tensors_to_hf(name, t, fmt) if fmt in MOE_FORMATS else None
        if moe is not None:
            out.update(moe)
            continue
        if name.endswith("attention.wq.weight"):
            t = interleaved_to_halves(t, model["n_heads"])
        elif name.endswith("attention.wk.weight"):
            t = interleaved_to_halves(t, kv)
        elif name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
            t = _norm_to_halves(t)
        out[hf_name(name)] = t.contiguous()
    return out


def from_hf(state: dict[str, torch.Tensor], hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HF Llama / Mixtral / Qwen3-MoE tensors -> our names and interleaved q/k rows."""
    reverse = {v: k for k, v in _TOP.items()}
    n_heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads") or n_heads
    out = {}
    if hf_config.get("model_type") in MOE_FORMATS:
        state = dict(state)  # the MoE tensors are taken out, the rest is Llama-shaped
        out.update(moe_tensors_from_hf(state, hf_config))
    for name, t in state.items():
        if name in reverse:
            ours = reverse[name]
        else:
            parts = name.split(".", 3)  # model.layers.<i>.<rest>
            rest = {v: k for k, v in _LAYER.items()}.get(parts[3] if len(parts) == 4 else "")
            if parts[:2] != ["model", "layers"] or rest is None:
                if "rotary_emb" in name:
                    continue
                raise CheckpointError(f"unexpected tensor {name!r}: not a plain Llama checkpoint")
            ours = f"layers.{parts[2]}.{rest}"
        if ours.endswith("attention.wq.weight"):
            t = halves_to_interleaved(t, n_heads)
        elif ours.endswith("attention.wk.weight"):
            t = halves_to_interleaved(t, kv)
        elif ours.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
            t = halves_to_interleaved(t.view(-1, 1), 1).view(-1)
        out[ours] = t.contiguous()
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]  # tied embeddings
    return out


def hf_config(
    model: dict[str, Any], hidden_dim: int, dtype: torch.dtype, fmt: str = "llama"
) -> dict[str, Any]:
    """config.json for LlamaForCausalLM (or an MoE format) from our model config (a dict of ModelConfig)."""
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model["dim"],
        "intermediate_size": hidden_dim,
        "num_hidden_layers": model["n_layers"],
        "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model.get("n_kv_heads") or model["n_heads"],
        "head_dim": model.get("attn_head_dim") or model["dim"] // model["n_heads"],
        "vocab_size": model["vocab_size"],
        "max_position_embeddings": model["max_seq_len"],
        "rms_norm_eps": model["norm_eps"],
        "rope_theta": model["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": model["rope_theta"]},
        "tie_word_embeddings": bool(model.get("tie_embeddings")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": model.get("init_std", 0.02),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
    }
    return moe_hf_config(llama, model, fmt, hidden_dim) if fmt in MOE_FORMATS else llama


def model_config_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """Our `model.*` values for an HF Llama, Mixtral or Qwen3-MoE config.json (refuses variants we do
    not implement)."""
    kind = cfg.get("model_type")
    if kind not in ("llama", *MOE_FORMATS):
        raise CheckpointError(f"config.json: model_type {kind!r}; supported: llama, {', '.join(MOE_FORMATS)}")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise CheckpointError(f"config.json: {key}={cfg[key]!r} is not supported (needs {ok!r})")
    scaling = cfg.get("rope_scaling") or {}
    rope = cfg.get("rope_parameters") or {}
    if scaling or rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"config.json: rope scaling {scaling or rope} is not supported")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or dim // heads
    base = {
        "dim": dim,
        "n_layers": cfg["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": cfg.get("num_key_value_heads") or heads,
        "vocab_size": cfg["vocab_size"],
        "ffn_dim": cfg["intermediate_size"],
        "norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        "max_seq_len": cfg.get("max_position_embeddings", 2048),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }
    base["attn_head_dim"] = None if head_dim == dim // heads else head_dim  # e.g. Llama-style 3B/Gemma widths
    return base if kind == "llama" else moe_model_config_from_hf(cfg, base)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names (in order) into shards of at most max_shard_bytes (a bigger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """model.safetensors.index.json, HF's map from tensor name to shard file (only for >1 shard)."""
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_hf(
    folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], max_shard_bytes: int = 5 << 30
) -> list[Path]:
    """In-memory tensors as safetensors shards (+ index when more than one) and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = plan_shards({n: t.numel() * t.element_size() for n, t in tensors.items()}, max_shard_bytes)
    weight_map = {}
    for i, names in enumerate(groups):
        save_file(
            {n: tensors[n] for n in names},
            str(folder / shard_name(i, len(groups))),
            metadata={"format": "pt"},
        )
        honour_umask(folder / shard_name(i, len(groups)))
        weight_map.update(dict.fromkeys(names, shard_name(i, len(groups))))
    write_index(folder, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return [folder / shard_name(i, len(groups)) for i in range(len(groups))]


def load_hf(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config.json of an HF model folder (single or sharded safetensors)."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not a Hugging Face model folder)")
    config = json.loads(cfg_file.read_text())
    index = folder / "model.safetensors.index.json"
    names = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing safetensors file (only .safetensors weights are read)")
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:
            raise CheckpointError(f"{f}: unreadable safetensors ({e})") from e
    return tensors, config
