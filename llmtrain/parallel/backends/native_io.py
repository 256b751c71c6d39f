"""Read a *native* llmtrain checkpoint (torch DCP, native parameter names) from another engine.

This is how a project switches engines: `checkpoint.init_from=<native checkpoint>` (or resume from one)
hands the engine a DCP folder; the DeepSpeed and megatron engines recognise it by DCP's `.metadata`
file and load the full weights (optimizer state does not carry over between engines). The other way,
`tools/to_native.py` and `Engine.full_model_state` produce native checkpoints.
"""

from pathlib import Path

import torch

from llmtrain.checkpoint.dcp_io import read_tensors, tensor_shapes


def is_native_checkpoint(folder: Path) -> bool:
    """A DCP folder written by the native engine or the checkpoint tools (not an engine's own files)."""
    return (Path(folder) / ".metadata").is_file()


def read_native_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All full model tensors under their native names (every rank reads them: small/medium models)."""
    names = sorted(tensor_shapes(Path(folder)))
    return read_tensors(Path(folder), names)
