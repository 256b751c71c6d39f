"""Checkpoint <-> Hugging Face folder conversion (the logic behind tools/export_hf.py, import_hf.py)."""

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from llmtrain.checkpoint.dcp_io import read_tensors, tensor_shapes, verify_dcp
from llmtrain.checkpoint.folder import ENGINE_DIR, CheckpointError, resolve_checkpoint_path
from llmtrain.checkpoint.formats import engine_of, to_native
from llmtrain.checkpoint.hf import (
    from_hf,
    hf_config,
    load_hf,
    model_config_from_hf,
    plan_shards,
    shard_name,
    to_hf,
    write_index,
)
from llmtrain.checkpoint.hf_moe import resolve_format
from llmtrain.checkpoint.lora_merge import merge_lora_checkpoint
from llmtrain.checkpoint.state import TrainerState
from llmtrain.checkpoint.weights import write_weights_checkpoint
from llmtrain.models.llama import TransformerArgs
from llmtrain.paths import honour_umask

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MASKED_LM_REFUSAL = (
    "{path}: objective.name=masked_lm trained a bidirectional encoder; a LlamaForCausalLM export would run it "
    "with causal attention (other logits) and transformers has no bidirectional Llama model type to export it "
    "as: evaluate it with tools/evaluate.py, or fine-tune it causally (objective=causal_lm "
    "checkpoint.init_from=...) before exporting"
)


def _hidden_dim(model: dict[str, Any]) -> int:
    fields = TransformerArgs.__dataclass_fields__
    return TransformerArgs(**{k: v for k, v in model.items() if k in fields and k != "name"}).hidden_dim


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    max_shard_gb: float = 5.0,
    tokenizer: bool = True,
    progress: bool = False,
    hf_format: str = "auto",
) -> Path:
    """Write the model of an llmtrain checkpoint (any parallel layout) as an HF folder in `hf_format`
    (llama, mixtral, qwen3_moe; auto: llama for dense models, else the MoE format that expresses the
    model exactly, see llmtrain.checkpoint.hf_moe), with the run's tokenizer
    (llmtrain.checkpoint.hf_tokenizer) unless tokenizer=False; a LoRA checkpoint is merged
    into its base weights first, a DeepSpeed or megatron one converted to native weights.
    progress=True shows a bar (bytes) on stderr.

    Streams: one safetensors shard's tensors are read from the DCP files at a time, so memory stays
    around one shard (never the optimizer state, never the whole model for large ones)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    path = resolve_checkpoint_path(checkpoint)
    state = TrainerState.read(path)
    config = state.config
    if (config.get("objective") or {}).get("name") == "masked_lm":
        raise CheckpointError(MASKED_LM_REFUSAL.format(path=path))
    Path(out).resolve().parent.mkdir(
        parents=True, exist_ok=True
    )  # the temporary folders below sit beside out
    if (config.get("peft") or {}).get("method") == "lora":  # fold the adapters in first (into a temp folder)
        with tempfile.TemporaryDirectory(dir=Path(out).resolve().parent) as tmp:
            merged = merge_lora_checkpoint(path, Path(tmp) / "merged")
            out = export_hf(merged, out, dtype, max_shard_gb, False, progress, hf_format)
        if tokenizer:
            _write_tokenizer(config, out)
        return out
    if engine_of(path) != "native":  # DeepSpeed / megatron files: gather native weights first
        with tempfile.TemporaryDirectory(dir=Path(out).resolve().parent) as tmp:
            native = to_native(path, Path(tmp) / "native")
            return export_hf(native, out, dtype, max_shard_gb, tokenizer, progress, hf_format)
    model = state.require_model(path)
    fmt = resolve_format(model, hf_format)
    verify_dcp(path / ENGINE_DIR)
    shapes = tensor_shapes(path / ENGINE_DIR)
    biases = [n for n in shapes if n.endswith("router.expert_bias")]
    if biases:  # refuse a moved selection bias before writing anything
        to_hf(read_tensors(path / ENGINE_DIR, biases, verify=False), model, fmt)
    itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    sizes = {n: shapes[n][0].numel() * itemsize for n in sorted(shapes)}
    groups = plan_shards(sizes, int(max_shard_gb * (1 << 30)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="export_hf", disable=not progress)
    for i, names in enumerate(groups):
        tensors = read_tensors(path / ENGINE_DIR, names, verify=False)
        hf = to_hf({k: v.to(DTYPES[dtype]) for k, v in tensors.items()}, model, fmt)
        save_file(hf, str(out / shard_name(i, len(groups))), metadata={"format": "pt"})
        honour_umask(out / shard_name(i, len(groups)))  # save_file creates it 0600
        weight_map.update(dict.fromkeys(hf, shard_name(i, len(groups))))
        total += sum(t.numel() * t.element_size() for t in hf.values())  # tied output.weight is not written
        bar.update(sum(sizes[n] for n in names))
    bar.close()
    write_index(out, weight_map, total)
    (out / "config.json").write_text(
        json.dumps(hf_config(model, _hidden_dim(model), DTYPES[dtype], fmt), indent=2)
    )
    if tokenizer:
        _write_tokenizer(config, out)
    return out


def _write_tokenizer(config: dict[str, Any], out: Path) -> None:
    """The run's `data.tokenizer` beside the weights, its special-token ids into config.json."""
    from llmtrain.checkpoint.hf_tokenizer import export_tokenizer, sft_chat_template

    spec = (config.get("data") or {}).get("tokenizer")
    if not spec:
        log.warning("tokenizer not exported: the checkpoint records no data.tokenizer")
        return
    what, ids = export_tokenizer(spec, out, int(config["model"]["max_seq_len"]), sft_chat_template(config))
    if not ids:
        log.warning("tokenizer %s", what)
        return
    hf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(hf | ids, indent=2))
    log.info("tokenizer: %s", what)


def import_hf(hf_folder: str | Path, out: str | Path) -> dict[str, Any]:
    """Write an HF Llama, Mixtral or Qwen3-MoE folder as an llmtrain checkpoint (weights only, step 0) for
    `checkpoint.init_from=<out>`; returns the `model.*` values the run must use."""
    hf_folder, out = Path(hf_folder), Path(out)
    tensors, config = load_hf(hf_folder)
    model = model_config_from_hf(config)
    ours = {k: v.float() for k, v in from_hf(tensors, config).items()}
    write_weights_checkpoint(out, ours, {"model": model}, source=str(hf_folder.resolve()))
    return model
