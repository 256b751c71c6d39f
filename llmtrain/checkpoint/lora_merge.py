"""Fold a LoRA run's adapters into its base weights as a plain llmtrain checkpoint.

A LoRA checkpoint holds only the adapters (peft.adapters_only_checkpoint) and names its frozen base
in `checkpoint.init_from`. `merge_lora_checkpoint` reads both in one process (no process group, any
saved layout), computes W' = W + (alpha / r) B A and writes a weights-only checkpoint of the plain
model, which `tools/export_hf.py` exports and `checkpoint.init_from` / `tools/evaluate.py` accept.
"""

import copy
from pathlib import Path

from llmtrain.checkpoint.dcp_io import read_tensors, tensor_shapes
from llmtrain.checkpoint.folder import ENGINE_DIR, CheckpointError, resolve_checkpoint_path
from llmtrain.checkpoint.pin import base_of
from llmtrain.checkpoint.state import TrainerState
from llmtrain.checkpoint.weights import write_weights_checkpoint
from llmtrain.models.lora import is_adapter, merge_lora_state


def merge_lora_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the merged plain model of a LoRA checkpoint to `out` (a new folder); returns it."""
    path = resolve_checkpoint_path(checkpoint)
    state = TrainerState.read(path)
    cfg = state.config
    peft = cfg.get("peft") or {}
    if peft.get("method") != "lora":
        raise CheckpointError(f"{path}: not a LoRA checkpoint (peft.method={peft.get('method')!r})")
    own = sorted(tensor_shapes(path / ENGINE_DIR))
    tensors = read_tensors(path / ENGINE_DIR, own)
    if not any(not is_adapter(k) for k in own):  # adapters only: the base comes from init_from
        base = base_of(state.init_from, cfg, path)  # the pinned base, checked unchanged
        if base is None:
            raise CheckpointError(f"{path}: adapters-only checkpoint without checkpoint.init_from (no base)")
        names = [k for k in tensor_shapes(base / ENGINE_DIR) if not is_adapter(k)]
        tensors = {**read_tensors(base / ENGINE_DIR, names), **tensors}
    merged = merge_lora_state(tensors, float(peft["alpha"]) / int(peft["rank"]))
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg["peft"] = {**peft, "method": "none"}
    plain_cfg.setdefault("checkpoint", {})["init_from"] = None
    return write_weights_checkpoint(
        out,
        merged,
        plain_cfg,
        source=f"lora-merge:{path.resolve()}",
        step=state.step,
        tokens_seen=state.tokens_seen,
    )
