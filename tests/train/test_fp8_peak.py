"""MFU with parallel.fp8 divides by the FP8 datasheet peak, and the console line says which peak."""

import torch

from llmtrain.tracking.console import format_line
from llmtrain.train.flops import lookup_peak_tflops
from llmtrain.train.perf import MeasuredPeak, Meter, peak_label, peak_tflops

FP8 = torch.float8_e4m3fn


def test_fp8_table_has_the_datasheet_dense_peaks() -> None:
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "fp8") == ("H100 SXM", 1979.0)
    assert lookup_peak_tflops("NVIDIA H200", "fp8") == ("H200 SXM", 1979.0)
    assert lookup_peak_tflops("NVIDIA B200", "fp8") == ("B200", 4500.0)
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989.4)  # bf16 unchanged
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "fp8") is None  # no FP8 tensor cores


def test_cpu_fp8_peak_is_the_emulation_fp32_rate() -> None:
    # emulated FP8 multiplies in fp32 on CPU: the measured fp32 GEMM peak is the denominator
    got = peak_tflops(torch.device("cpu"), None, FP8)
    assert isinstance(got, MeasuredPeak) and got == peak_tflops(torch.device("cpu"), None, torch.float32)
    assert peak_label(FP8, got).startswith("cpu fp32 (fp8 emulated) ")


def test_console_line_names_the_peak() -> None:
    meter = Meter(1e9, 1979.0, 1, peak_dtype=FP8)
    meter.update(tokens=814_000, seconds=1.0, data_seconds=0.0)  # 814 TFLOP/s of 1979 = 41.1%
    m = {"train/loss": 2.0, "train/lr": 1e-3, "train/grad_norm": 0.5, **meter.metrics(0)}
    line = format_line(1, 10, m, meter.peak_label)
    assert "mfu 41.1% of fp8 1979 |" in line, line
    assert "mfu 41.1% |" in format_line(1, 10, m)
    assert Meter(1e9, 989.4, 1, peak_dtype=torch.bfloat16).peak_label == "bf16 989.4"
