"""Weights-only checkpoints: writing full weights in the llmtrain format, and the parameter names a
checkpoint holds.

One writer (`write_weights_checkpoint`) serves HF import, engine conversion and LoRA merging, so the
three produce one format that `checkpoint.init_from`, evaluation and export accept.
"""

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from llmtrain.checkpoint.dcp_io import write_tensors
from llmtrain.checkpoint.folder import ENGINE_DIR, CheckpointError, write_manifest
from llmtrain.checkpoint.state import TrainerState


def write_weights_checkpoint(
    out: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    source: str,
    step: int = 0,
    tokens_seen: int = 0,
) -> Path:
    """Write full weights as a weights-only llmtrain checkpoint (for `checkpoint.init_from`).

    Same atomicity as a training save: a temporary folder, renamed into place, then the manifest."""
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: exists; choose a new output folder")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_tensors(tmp / ENGINE_DIR, tensors)
    TrainerState(step=step, tokens_seen=tokens_seen, config=config, source=source).write(tmp)
    os.replace(tmp, out)
    write_manifest(out, step)
    return out


def saved_model_keys(dcp_folder: Path) -> set[str]:
    """Model parameter names in a DCP folder (a checkpoint's model_optim/), from its metadata only."""
    meta = dcp.FileSystemReader(str(dcp_folder)).read_metadata()
    return {k[len("model.") :] for k in meta.state_dict_metadata if k.startswith("model.")}
