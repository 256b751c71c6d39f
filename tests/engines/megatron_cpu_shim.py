"""TEST-ONLY shim that lets megatron-core 0.16.1 run its GPT model, pipeline schedules and DDP on CPU.

Never imported by library code. megatron-core assumes CUDA in a few *bookkeeping* places, not in its
math: buffers allocated on `torch.cuda.current_device()` (GlobalMemoryBuffer, DDP grad buffers, p2p
shape tensors), `device="cuda"` token counters in the schedules and the default causal mask,
`torch.cuda.synchronize()` after p2p, `weight.data.cuda()` for the tied-embedding copy on the last
pipeline stage, and the model-parallel RNG tracker that forks the CUDA generator around attention. The
shim answers those with the CPU equivalents; every layer, the loss, the schedules' send/recv order and
the gradient reductions are megatron's own code. Evidence that this is sound: with the shim, DP2, TP2,
PP2 (1F1B, interleaved) and tied-embedding TP2/PP2 training losses equal the native single-process run
to < 1e-7 relative (tests/engines/test_megatron.py); a wrong allocation device would fail loudly, and
the RNG tracker only matters for dropout (0 here). What it cannot cover (see docs/engines.md): the
DistributedOptimizer and sequence parallelism (apex/TransformerEngine norms, CUDA streams).

Call `install()` in each (spawned) process before building a megatron model.
"""

import torch

_FACTORIES = ("zeros", "empty", "ones", "full", "tensor", "arange", "zeros_like", "empty_like")


def _cpu_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


class _TorchOnCpu:
    """Stands in for the `torch` name inside a few megatron modules: factories ignore device='cuda'."""

    def __init__(self, cuda: object) -> None:
        self._cuda = cuda

    def __getattr__(self, name: str):
        if name == "cuda":
            return self._cuda
        attr = getattr(torch, name)
        if name in _FACTORIES:

            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return attr(*args, **kwargs)

            return factory
        return attr


class _CudaOnCpu:
    """`torch.cuda` as the RNG tracker sees it: the CPU generator."""

    def __getattr__(self, name: str):
        if name == "get_rng_state":
            return lambda device=None: torch.get_rng_state()
        if name == "manual_seed":
            return torch.manual_seed
        return getattr(torch.cuda, name)


def install() -> None:
    """Idempotent. Patches this process only."""
    import megatron.core
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as transformer_utils

    if getattr(megatron.core, "_llmtrain_cpu_shim", False):
        return
    torch.cuda.current_device = lambda: "cpu"  # allocations "on the current device" land on CPU
    torch.cuda.synchronize = lambda *a, **k: None
    # tied embeddings with pp > 1: LanguageModule moves the last stage's copy with `.data.cuda()`
    torch.Tensor.cuda = lambda self, *a, **k: self
    mp_random._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)
    mp_random.torch = _TorchOnCpu(_CudaOnCpu())
    schedules.torch = _TorchOnCpu(torch.cuda)
    p2p_communication.torch = _TorchOnCpu(torch.cuda)
    transformer_utils.torch = _TorchOnCpu(torch.cuda)  # get_default_causal_mask(device="cuda")
    megatron.core._llmtrain_cpu_shim = True  # the engine checks this before running on CPU
