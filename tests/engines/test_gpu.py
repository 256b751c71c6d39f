"""Engine parity on one CUDA device (marked `gpu`: runs only where a GPU is lent; no CPU shim here).

One process, so DeepSpeed ZeRO-0 and megatron TP1/PP1 run their real CUDA code paths (NCCL group of 1,
megatron's CUDA RNG tracker and buffers) against the native single-process CPU reference. Tolerance
1e-4 relative: CUDA kernels reduce in another order than the CPU ones.
"""

import pytest
import torch

from llmtrain.parallel.dims import ParallelDims
from tests.engines.common import LR, OVERRIDES, STEPS, max_rel_diff, native_reference, rank_batches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (lent GPU sessions only)"),
]


def _steps(engine, device: torch.device) -> list[tuple[float, float]]:
    out = []
    for s in range(STEPS):
        r = engine.train_step([b.to(device) for b in rank_batches(s, 1, 0)], LR)
        out.append((r.loss, r.grad_norm))
    return out


@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_engine_on_one_gpu_matches_native(make_config, backend) -> None:
    pytest.importorskip({"deepspeed": "deepspeed", "megatron": "megatron.core"}[backend])
    from llmtrain.parallel.build import build_engine

    cfg = make_config(*OVERRIDES, f"parallel.backend={backend}", "parallel.sequence_parallel=false")
    ref = native_reference(cfg)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    engine = build_engine(cfg, ParallelDims(1, 1, 1, 1, 1), None, device)
    d_loss, d_norm = max_rel_diff(_steps(engine, device), ref)
    assert d_loss < 1e-4 and d_norm < 1e-3, (backend, d_loss, d_norm)
