"""Hugging Face interop for mixture-of-experts models: the Mixtral and Qwen3-MoE formats.

Our MoE layer (llmtrain/models/moe.py) stores the experts as (E, in, out) tensors used as `x @ w[e]`;
the Hub checkpoints of both formats hold one `nn.Linear` weight (out, in) per expert, so export
transposes each expert's slice and import stacks them back (transformers 5 fuses them into
`gate_up_proj` / `down_proj` at load time and splits them again in `save_pretrained`, so its saved
folders have the Hub layout too). The router weight (E, dim) has the same layout on both sides.

What each format can express, and so what export refuses (naming our config key):

| | Mixtral (`MixtralForCausalLM`) | Qwen3-MoE (`Qwen3MoeForCausalLM`) |
| --- | --- | --- |
| router | softmax, top-k always renormalised | softmax, `norm_topk_prob` = `moe_norm_topk` |
| dense layers | none (every layer MoE) | any (`mlp_only_layers`) |
| q/k norm | none | always (per head, before RoPE): needs `model.qk_norm=true` |
| shared experts, sigmoid scores, route scale, selection bias | no | no |

The selection bias of aux-loss-free balancing changes which experts a token picks, and neither
format has it: export refuses `moe_bias_update_rate > 0`, and a non-zero `expert_bias` tensor.
"""

from typing import Any

import torch

from llmtrain.checkpoint.folder import CheckpointError

MOE_FORMATS = ("mixtral", "qwen3_moe")
HF_FORMATS = ("auto", "llama", *MOE_FORMATS)
_EXPERT_HF = {  # our expert tensor -> (Mixtral name, Qwen3-MoE name) of one expert's Linear
    "w1": ("w1", "gate_proj"),
    "w3": ("w3", "up_proj"),
    "w2": ("w2", "down_proj"),
}
_ARCH = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def _is_moe_layer(model: dict[str, Any], i: int) -> bool:
    """The rule of `TransformerArgs.is_moe_layer`, on a config dict."""
    return i >= model.get("moe_first_k_dense", 0) and i % model.get("moe_every", 1) == 0


def format_refusals(model: dict[str, Any], fmt: str) -> list[str]:
    """Why `model` (a dict of ModelConfig) cannot be written exactly as `fmt`; empty when it can."""
    if not model.get("moe_num_experts"):
        return (
            []
            if fmt == "llama"
            else [f"model.moe_num_experts=0 is a dense model: export it as llama, not {fmt}"]
        )
    if fmt == "llama":
        return [f"model.moe_num_experts={model['moe_num_experts']}: LlamaForCausalLM has no experts"]
    why = []
    for key, ok, what in (
        ("moe_shared_experts", 0, "shared experts"),
        ("moe_score", "softmax", "sigmoid router scores"),
        ("moe_route_scale", 1.0, "a routing-weight scale"),
        ("moe_bias_update_rate", 0.0, "the expert selection bias of aux-loss-free balancing"),
    ):
        if model.get(key, ok) != ok:
            why.append(f"model.{key}={model[key]} (needs {ok}): {fmt} has no {what}")
    if fmt == "mixtral":
        if not model.get("moe_norm_topk", True):
            why.append("model.moe_norm_topk=false: Mixtral always renormalises the top-k weights")
        if model.get("moe_first_k_dense", 0) or model.get("moe_every", 1) != 1:
            why.append(
                f"model.moe_first_k_dense={model.get('moe_first_k_dense', 0)}, model.moe_every="
                f"{model.get('moe_every', 1)}: every Mixtral layer is MoE (needs 0 and 1)"
            )
        if model.get("qk_norm"):
            why.append("model.qk_norm=true: Mixtral attention has no q/k norm")
    elif not model.get("qk_norm"):
        why.append("model.qk_norm=false: Qwen3-MoE attention always normalises q and k per head")
    return why


def resolve_format(model: dict[str, Any], requested: str) -> str:
    """The HF format to write: `requested`, or for `auto` llama (dense), else the first MoE format
    that expresses the model exactly. Raises naming every key that stands in the way."""
    if requested not in HF_FORMATS:
        raise CheckpointError(f"format {requested!r}; allowed: {', '.join(HF_FORMATS)}")
    if requested == "auto":
        if not model.get("moe_num_experts"):
            return "llama"
        requested = next((f for f in MOE_FORMATS if not format_refusals(model, f)), "mixtral")
        if format_refusals(model, requested):
            reasons = {f: "; ".join(format_refusals(model, f)) for f in MOE_FORMATS}
            raise CheckpointError(
                "this MoE model fits neither HF format exactly: "
                + " | ".join(f"{f}: {r}" for f, r in reasons.items())
            )
    why = format_refusals(model, requested)
    if why:
        raise CheckpointError(f"cannot export as {requested}: " + "; ".join(why))
    return requested


def moe_tensors_to_hf(name: str, t: torch.Tensor, fmt: str) -> dict[str, torch.Tensor] | None:
    """HF tensors for one of our MoE tensors (`layers.<i>.feed_forward.{router,experts}...`), {} for
    the selection bias (checked to be zero), None for a tensor that is not MoE-specific."""
    parts = name.split(".")
    if len(parts) < 5 or parts[2] != "feed_forward" or parts[3] not in ("router", "experts"):
        return None
    block = f"model.layers.{parts[1]}." + ("block_sparse_moe" if fmt == "mixtral" else "mlp")
    if parts[3] == "router":
        if parts[4] == "expert_bias":
            if t.abs().max() > 0:
                raise CheckpointError(f"{name} is non-zero: {fmt} routing has no selection bias")
            return {}
        return {f"{block}.gate.weight": t.contiguous()}
    hf = _EXPERT_HF[parts[4]][MOE_FORMATS.index(fmt)]
    return {f"{block}.experts.{e}.{hf}.weight": t[e].t().contiguous() for e in range(t.shape[0])}


def moe_hf_config(llama: dict[str, Any], model: dict[str, Any], fmt: str, hidden_dim: int) -> dict[str, Any]:
    """config.json of `fmt` for our MoE model: the Llama config.json (`llama`, the attention and
    embedding keys) with the MoE keys (format_refusals(model, fmt) must be empty)."""
    expert_dim = model.get("moe_expert_dim") or hidden_dim
    cfg = {k: v for k, v in llama.items() if k not in ("mlp_bias", "intermediate_size")} | {
        "architectures": [_ARCH[fmt]],
        "model_type": fmt,
        "head_dim": model.get("attn_head_dim") or model["dim"] // model["n_heads"],
        "sliding_window": None,
        "use_sliding_window": False,
        "num_experts_per_tok": model["moe_top_k"],
        "router_aux_loss_coef": model.get("moe_aux_loss_coef", 0.0),
    }
    if fmt == "mixtral":
        return cfg | {"num_local_experts": model["moe_num_experts"], "intermediate_size": expert_dim}
    dense = [i for i in range(model["n_layers"]) if not _is_moe_layer(model, i)]
    return cfg | {
        "num_experts": model["moe_num_experts"],
        "moe_intermediate_size": expert_dim,
        "intermediate_size": hidden_dim,
        "norm_topk_prob": bool(model.get("moe_norm_topk", True)),
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense,
    }


def _num_experts(cfg: dict[str, Any]) -> int:
    """Experts per layer: Mixtral's num_local_experts; Qwen3-MoE writes num_experts, but transformers
    5 saves it under its attribute-map name num_local_experts too."""
    return cfg.get("num_local_experts") or cfg["num_experts"]


def moe_model_config_from_hf(cfg: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Our `model.*` values for a Mixtral / Qwen3-MoE config.json; `base` holds the attention and
    embedding keys read the Llama way (llmtrain.checkpoint.hf.model_config_from_hf)."""
    fmt, n_layers = cfg["model_type"], cfg["num_hidden_layers"]
    if cfg.get("router_jitter_noise"):
        raise CheckpointError(
            f"config.json: router_jitter_noise={cfg['router_jitter_noise']} is not supported"
        )
    out = base | {"moe_top_k": cfg["num_experts_per_tok"], "moe_score": "softmax", "moe_route_scale": 1.0}
    if fmt == "mixtral":
        return out | {
            "moe_num_experts": _num_experts(cfg),
            "moe_expert_dim": cfg["intermediate_size"],
            "moe_norm_topk": True,
            "moe_first_k_dense": 0,
            "moe_every": 1,
        }
    step, dense = cfg.get("decoder_sparse_step", 1), sorted(cfg.get("mlp_only_layers") or [])
    moe = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    k = moe[0] if moe else n_layers
    if step != 1 or moe != list(range(k, n_layers)):
        raise CheckpointError(
            f"config.json: MoE layers {moe} (decoder_sparse_step={step}, mlp_only_layers={dense}) are not "
            "'every layer from the k-th on' (model.moe_first_k_dense), the only pattern we import"
        )
    return out | {
        "moe_num_experts": _num_experts(cfg),
        "moe_expert_dim": cfg["moe_intermediate_size"],
        "moe_norm_topk": bool(cfg.get("norm_topk_prob", False)),
        "moe_first_k_dense": k,
        "moe_every": 1,
        "qk_norm": True,
    }


def moe_tensors_from_hf(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Pop the MoE tensors of an HF Mixtral / Qwen3-MoE state (per-expert Hub layout) and return them
    under our names; what stays in `state` is Llama-shaped. Every MoE layer gets a zero `expert_bias`."""
    fmt = cfg["model_type"]
    block = "block_sparse_moe" if fmt == "mixtral" else "mlp"
    num = _num_experts(cfg)
    out: dict[str, torch.Tensor] = {}
    layers = {int(n.split(".")[2]) for n in state if f".{block}.gate.weight" in n}
    for i in sorted(layers):
        pre, ours = f"model.layers.{i}.{block}.", f"layers.{i}.feed_forward."
        router = state.pop(pre + "gate.weight")
        out[ours + "router.weight"] = router
        out[ours + "router.expert_bias"] = torch.zeros(num, dtype=router.dtype)
        names = {k: v[MOE_FORMATS.index(fmt)] for k, v in _EXPERT_HF.items()}
        try:
            mats = {
                k: torch.stack([state.pop(f"{pre}experts.{e}.{n}.weight") for e in range(num)])
                for k, n in names.items()
            }
        except KeyError as e:
            raise CheckpointError(f"{fmt} checkpoint: tensor {e} missing ({num} experts per layer)") from e
        for k, m in mats.items():
            out[ours + f"experts.{k}"] = m.transpose(1, 2).contiguous()
    return out
