"""RNG state of one rank: torch (CPU and CUDA) as tensors, Python and NumPy as JSON-able values.

Exact resume needs every generator a step may draw from; each rank saves its own (ranks differ, e.g.
dropout under tensor parallelism), and loading uses `weights_only=True` / JSON, never pickle.
"""

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def capture_torch_rng() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def capture_host_rng() -> dict[str, Any]:
    """Python `random` and NumPy global generator states as plain JSON values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def save_torch_rng(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture_torch_rng(), path)


def restore_rng(torch_file: Path | None, host: dict[str, Any] | None) -> None:
    """Restore what was captured; missing parts (another world size) leave the generator as seeded."""
    if torch_file is not None and torch_file.is_file():
        state = torch.load(torch_file, weights_only=True)
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    if host:
        version, internal, gauss = host["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = host["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
