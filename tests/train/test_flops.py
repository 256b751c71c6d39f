"""The FLOPs formula against torch's own FLOP counter on the real model, the peak table, and MFU/HFU.

The counter runs with the math SDPA backend, which lowers attention to two batched matmuls (the
CPU flash kernel is not registered with FlopCounterMode). That is exactly our convention: the full
seq x seq square and backward = 2 x forward, so the formula must match to float rounding (rel 1e-9).
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llmtrain.models.llama import Transformer, TransformerArgs
from llmtrain.parallel.parallelize import apply_activation_checkpointing
from llmtrain.train.flops import (
    device_peak_tflops,
    flops_per_token,
    lookup_peak_tflops,
    recompute_fraction,
)
from llmtrain.train.perf import Meter, peak_tflops

SHAPES = [  # (args, batch, seq): MHA untied, GQA untied, GQA tied, MQA
    (TransformerArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, ffn_dim=160), 2, 32),
    (TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=130, ffn_dim=96), 1, 48),
    (TransformerArgs(dim=48, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=64, tie_embeddings=True), 2, 16),
    (TransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=80, ffn_dim=64), 3, 24),
]


def counted_train_flops(model: Transformer, batch: int, seq: int) -> int:
    torch.manual_seed(0)
    tokens = torch.randint(0, model.args.vocab_size, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).float().pow(2).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("args,batch,seq", SHAPES)
def test_formula_matches_torch_flop_counter(args: TransformerArgs, batch: int, seq: int) -> None:
    torch.set_num_threads(1)
    model = Transformer(args)
    counted = counted_train_flops(model, batch, seq)
    predicted = flops_per_token(args, seq) * batch * seq
    assert predicted == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_hfu_counts_recomputed_blocks(mode: str) -> None:
    torch.set_num_threads(1)
    args, batch, seq = SHAPES[1][0], 2, 32
    args = TransformerArgs(**{**args.__dict__, "n_layers": 3})
    model = Transformer(args)
    apply_activation_checkpointing(model, mode)  # what the native engine applies
    counted = counted_train_flops(model, batch, seq)
    hfu = flops_per_token(args, seq, recompute_fraction(mode, args.n_layers)) * batch * seq
    assert hfu == pytest.approx(counted, rel=1e-9)
    assert hfu > flops_per_token(args, seq) * batch * seq  # HFU > MFU numerator


def test_recompute_fraction_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match=r"parallel\.activation_checkpoint"):
        recompute_fraction("some", 4)


@pytest.mark.parametrize(
    "name,label,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.4),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", "GH200", 989.4),
        ("NVIDIA H20", "H20", 148.0),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
        ("NVIDIA L40S", "L40S", 362.05),
        ("NVIDIA L4", "L4", 121.0),
        ("NVIDIA A10G", "A10G", 70.0),
        ("AMD Instinct MI300X", "MI300X", 1307.4),
    ],
)
def test_peak_table_picks_the_right_variant(name: str, label: str, tflops: float) -> None:
    assert lookup_peak_tflops(name) == (label, tflops)


def test_peak_unknown_device_and_override() -> None:
    assert device_peak_tflops("NVIDIA GeForce GTX 1080") is None
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", override=500.0) == 500.0
    assert peak_tflops(torch.device("cpu"), 123.0) == 123.0
    measured = peak_tflops(torch.device("cpu"), None)
    assert measured is not None and 1e-4 < measured < 100  # a real GEMM rate of 1-2 CPU threads


def test_meter_mfu_and_hfu() -> None:
    meter = Meter(flops_per_token=6e9, peak_tflops_per_device=100.0, world_size=4, hw_flops_per_token=8e9)
    meter.update(tokens=40_000, seconds=1.5, data_seconds=0.1)
    meter.update(tokens=40_000, seconds=2.5, data_seconds=0.1)
    m = meter.metrics(steps_left=10)
    assert m["perf/tokens_per_s"] == pytest.approx(20_000)
    assert m["perf/tflops_per_device"] == pytest.approx(20_000 * 6e9 / 4 / 1e12)
    assert m["perf/mfu"] == pytest.approx(0.3)
    assert m["perf/hfu"] == pytest.approx(0.4)
    assert m["perf/eta_s"] == pytest.approx(20.0)
    assert "perf/mfu" not in Meter(6e9, None, 1).metrics(0)  # unknown peak: no made-up MFU


def test_gpu_peak_from_reported_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The trainer's denominator on a GPU: the table entry for the name torch reports, never a CPU rate."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(cuda, None, torch.bfloat16) == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future GPU")
    with caplog.at_level("WARNING", logger="llmtrain"):
        assert peak_tflops(cuda, None, torch.bfloat16) is None
    assert "trainer.peak_tflops" in caplog.text
    assert peak_tflops(cuda, 700.0) == 700.0


def test_throughput_counts_every_input_token() -> None:
    from llmtrain.data.loader import IGNORE_INDEX, Batch
    from llmtrain.train.perf import processed_tokens

    targets = torch.full((2, 8), IGNORE_INDEX)
    targets[:, -2:] = 1  # a masked prompt: only 4 of 16 positions carry loss, all 16 cost FLOPs
    batches = [Batch(torch.zeros(2, 8, dtype=torch.long), targets)] * 3
    assert sum(b.num_tokens for b in batches) == 12
    assert processed_tokens(batches, dp_size=4, fallback=12) == 3 * 16 * 4
    assert processed_tokens([object()], dp_size=4, fallback=12) == 12


@pytest.mark.parametrize(
    "name,precision,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "fp32", 67.0),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
    ],
)
def test_peak_of_the_running_precision(name: str, precision: str, tflops: float) -> None:
    """fp32 with TF32 off runs on the CUDA cores: an fp32 run's MFU is against 67, not 989 TFLOP/s."""
    assert lookup_peak_tflops(name, precision)[1] == tflops


def test_gpu_peak_follows_the_training_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cuda", 0), None, torch.float32) == 67.0


@pytest.mark.parametrize(
    "targets",
    [
        ["wq", "wv"],
        ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
        ["wq", "wv", "output"],
        ["output"],
        ["w2"],
        ["wk"],
    ],
)
def test_lora_flops_match_torch_flop_counter(targets: list[str]) -> None:
    """Frozen base weights compute no weight gradient (and no input gradient where nothing upstream
    trains): the LoRA numerator equals the counted FLOPs, well below the full fine-tune's 6N."""
    from llmtrain.models.lora import apply_lora
    from llmtrain.train.flops import lora_flops_per_token

    torch.set_num_threads(1)
    args, batch, seq = SHAPES[1][0], 2, 48
    args = TransformerArgs(**{**args.__dict__, "n_layers": 3})
    model = Transformer(args)
    apply_lora(model, 4, 8.0, 0.0, targets)
    counted = counted_train_flops(model, batch, seq)
    assert lora_flops_per_token(args, seq, 4, targets) * batch * seq == pytest.approx(counted, rel=1e-9)
    assert counted < 0.8 * flops_per_token(args, seq) * batch * seq


def test_lora_flops_by_hand() -> None:
    """dim 64, 1 layer, 4 heads (q 64), 2 kv heads (kv 32), ffn 96, vocab 130, seq 8, r 2 on wq, wv.
    Base forward per token: 2 x (64*64 + 2*64*32 + 64*64 + 3*64*96) = 61,440 (block) + 2*64*130 =
    16,640 (head); attention forward 4*8*64 = 2048; adapters forward 2*2*(64+64) + 2*2*(64+32) = 896.
    Frozen weights 2x forward, attention and adapters 3x, minus what autograd skips in the only
    block: the q/k/v input gradients (2*64*64 + 2*2*64*32 = 16,384), the adapters' A input gradients
    (2*2*64 * 2 = 512) and dK (k needs no gradient: 2*8*64 = 1024)."""
    from llmtrain.train.flops import lora_flops_per_token

    args = TransformerArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=130, ffn_dim=96)
    expected = 2 * (61_440 + 16_640) + 3 * (2048 + 896) - (16_384 + 512 + 1024)
    assert lora_flops_per_token(args, 8, 2, ["wq", "wv"]) == expected
