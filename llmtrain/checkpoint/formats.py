"""Checkpoints of the DeepSpeed and megatron engines as native weights.

Every engine saves through our manager (same folder layout, atomicity, trainer state), but its
`model_optim/` holds the engine's own format: DCP shards (native), DeepSpeed's ZeRO files, or one
megatron file per (tp, pp) coordinate. Tools that read weights (export to Hugging Face, switching
engines with `checkpoint.init_from`) go through `to_native`, which writes a native weights-only
checkpoint; optimizer state does not carry over between engines.
"""

import re
from pathlib import Path

import torch

from llmtrain.checkpoint.folder import ENGINE_DIR, CheckpointError, resolve_checkpoint_path
from llmtrain.checkpoint.megatron_format import engine_files_to_native
from llmtrain.checkpoint.state import TrainerState
from llmtrain.checkpoint.weights import write_weights_checkpoint
from llmtrain.models.llama import TransformerArgs

MEGATRON_FILE = re.compile(r"^megatron_tp(\d+)-of-(\d+)_pp(\d+)-of-(\d+)\.pt$")
DEEPSPEED_TAG = "deepspeed"  # the tag our DeepSpeed engine saves under (backends/deepspeed.py CKPT_TAG)


def engine_of(path: Path) -> str:
    """Which engine wrote the checkpoint folder `path`: native, deepspeed or megatron."""
    engine_dir = path / ENGINE_DIR
    if (engine_dir / DEEPSPEED_TAG).is_dir():
        return "deepspeed"
    if any(MEGATRON_FILE.match(f.name) for f in engine_dir.glob("megatron_*.pt")):
        return "megatron"
    return "native"


def megatron_weights(path: Path) -> dict[str, torch.Tensor]:
    """Full native weights from a megatron-engine checkpoint (TP shards gathered, fused QKV and
    gate/up split, RoPE row order undone); needs neither megatron-core nor a process group."""
    state = TrainerState.read(path)
    model, parallel = state.require_model(path), state.config.get("parallel") or {}
    files = {MEGATRON_FILE.match(f.name): f for f in (path / ENGINE_DIR).glob("megatron_*.pt")}
    shards = {
        (int(m[1]), int(m[3])): torch.load(f, map_location="cpu", weights_only=True)
        for m, f in files.items()
        if m
    }
    if not shards:
        raise CheckpointError(f"{path / ENGINE_DIR}: no megatron engine files (megatron_tp*_pp*.pt)")
    tp, pp = int(next(m for m in files if m)[2]), int(next(m for m in files if m)[4])
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in shards]
    if missing:
        raise CheckpointError(f"{path / ENGINE_DIR}: missing shards (tp, pp) {missing}")
    vp = int(parallel.get("pp_virtual_stages", 1)) if pp > 1 else 1
    fields = TransformerArgs.__dataclass_fields__
    args = TransformerArgs(**{k: v for k, v in model.items() if k in fields})
    return engine_files_to_native(shards, args, tp, pp, vp)


def deepspeed_weights(engine_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from the `model_optim/` folder of a DeepSpeed-engine checkpoint (the fp32
    masters of ZeRO 1-3 shards, any world size), via DeepSpeed's zero_to_fp32. Holds the whole model in
    host memory."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise CheckpointError(
            f"{engine_dir}: reading a DeepSpeed checkpoint needs deepspeed (pip install 'llmtrain[deepspeed]')"
        ) from e
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=DEEPSPEED_TAG)
    return {k: v.float().contiguous() for k, v in state.items() if k != "rope"}


def to_native(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a native weights-only checkpoint at `out` from any engine's checkpoint (a step folder,
    a run's checkpoints/ folder or a run folder); keeps the run's model and data config."""
    path = resolve_checkpoint_path(checkpoint)
    engine = engine_of(path)
    if engine == "native":
        raise CheckpointError(f"{path}: already a native checkpoint")
    weights = megatron_weights(path) if engine == "megatron" else deepspeed_weights(path / ENGINE_DIR)
    config = TrainerState.read(path).config
    keep = {k: config[k] for k in ("model", "data") if k in config}
    return write_weights_checkpoint(out, weights, keep, source=str(path.resolve()))
