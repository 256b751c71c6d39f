"""`build_engine`: the one place that maps `parallel.backend` to an engine class. Kept apart from the
interface (parallel/engine.py), which the engines import, so the interface imports no engine."""

import torch
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.config import Config
from llmtrain.config.errors import ConfigError
from llmtrain.parallel.dims import ParallelDims
from llmtrain.parallel.engine import Engine, ModelTransform

INSTALL_HINT = {
    "deepspeed": "pip install 'llmtrain[deepspeed]'  (or: bash tools/setup.sh deepspeed)",
    "megatron": "pip install 'llmtrain[megatron]'  (or: bash tools/setup.sh megatron)",
}


def build_engine(
    cfg: Config,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    device: torch.device,
    transform: ModelTransform | None = None,
) -> Engine:
    """The engine named by parallel.backend; missing optional engines give the install command.
    `transform` (e.g. LoRA from `llmtrain.peft.build_peft`) is applied by the native engine; the others
    refuse any but the identity (config validation already refuses peft on them)."""
    backend = cfg.parallel.backend
    if backend == "native":
        from llmtrain.parallel.native import NativeEngine

        return NativeEngine(cfg, dims, mesh, device, transform)
    if transform is not None and type(transform) is not ModelTransform:
        raise ConfigError(
            f"parallel.backend={backend} does not apply model transforms ({type(transform).__name__})"
        )
    try:
        if backend == "deepspeed":
            from llmtrain.parallel.backends.deepspeed import DeepSpeedEngine as EngineCls
        else:
            from llmtrain.parallel.backends.megatron import MegatronEngine as EngineCls
    except ImportError as e:
        raise ConfigError(
            f"parallel.backend={backend} needs an optional package that is not installed ({e.name or e}); "
            f"install it with: {INSTALL_HINT[backend]}"
        ) from e
    return EngineCls(cfg, dims, mesh, device)
