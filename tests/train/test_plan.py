"""The planner's memory estimate against measured peak tensor memory of real steps, and its CLI.

Measured = `PeakTensorMemory` (live tensor storage bytes, the CPU analogue of
torch.cuda.max_memory_allocated) over three optimizer steps of the trainer's own `train_step`.
Tolerance 5%; the errors measured when this was written were within 3% (docs/performance.md).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtrain.config.model import ModelConfig
from llmtrain.models import build_model, model_args
from llmtrain.models.build import count_params
from llmtrain.plan.fit import Cluster, Layout, plan_layout, suggest_layouts
from llmtrain.plan.measure import measure_train_peak
from llmtrain.plan.memory import GIB, act_bytes_per_token, estimate_memory, total_params

ROOT = Path(__file__).resolve().parents[2]


def small(vocab: int = 512, tie: bool = False) -> ModelConfig:
    return ModelConfig(
        name="t",
        dim=64,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=160,
        vocab_size=vocab,
        max_seq_len=256,
        tie_embeddings=tie,
    )


@pytest.mark.parametrize(
    "vocab,precision,mbs,accum,ac",
    [(512, "fp32", 2, 1, "none"), (2048, "bf16", 2, 2, "selective"), (512, "fp32", 2, 1, "full")],
)
def test_memory_estimate_matches_measured_peak(
    vocab: int, precision: str, mbs: int, accum: int, ac: str
) -> None:
    torch.set_num_threads(1)
    cfg, seq = small(vocab), 96
    measured = measure_train_peak(
        cfg,
        seq_len=seq,
        micro_batch_size=mbs,
        grad_accum=accum,
        precision=precision,
        activation_checkpoint=ac,
        steps=2,
    )
    layout = Layout(micro_batch_size=mbs, activation_checkpoint=ac)
    est = estimate_memory(model_args(cfg), seq, layout, precision=precision, grad_accum=accum)
    assert est.total == pytest.approx(measured, rel=0.05)


def _saved_bytes_per_token(args, dtype: torch.dtype, tokens: int) -> float:
    """Bytes of the distinct storages one block's autograd graph saves, per token (weights, their
    autocast casts and the block input excluded, as the planner counts them apart)."""
    from llmtrain.models.llama import TransformerBlock, rope_tables

    block = TransformerBlock(args).to(dtype)
    x = torch.randn(2, tokens // 2, args.dim, dtype=dtype, requires_grad=True)
    rope = rope_tables(args.head_dim, tokens // 2, 10000.0)[None]
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        block(x, rope)
    skip = {p.untyped_storage().data_ptr() for p in block.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(n for ptr, n in seen.items() if ptr not in skip) / tokens


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_heads=8, n_kv_heads=8),
        dict(n_heads=4, n_kv_heads=2, attn_head_dim=32),
        dict(dim=384, ffn_dim=512),
    ],
)
def test_bf16_parameter_activations_match_the_saved_tensors(shape: dict) -> None:
    """With FSDP casting the parameters to bf16 (parallel.param_dtype=bf16) a block saves the bf16
    norm outputs once for all of q/k/v (and w1/w3) instead of an autocast cast per linear: the
    planner's per-token bytes equal the saved tensors within 2% (the autocast formula was 7-10% high
    here, the dry run's ZeRO-3 bf16 ratio 0.83)."""
    from llmtrain.models.llama import TransformerArgs

    kw = {"dim": 256, "ffn_dim": 768, "n_heads": 8, **shape}
    args = TransformerArgs(n_layers=1, vocab_size=512, max_seq_len=256, **kw)
    measured = _saved_bytes_per_token(args, torch.bfloat16, 512) + 2 * args.dim  # + the bf16 input
    planned = act_bytes_per_token(args, "bf16", 1, False, bf16_params=True)
    assert planned == pytest.approx(measured, rel=0.02)
    assert act_bytes_per_token(args, "bf16", 1, False) > 1.05 * measured  # the autocast formula


def test_checkpointing_lowers_the_estimate_as_much_as_the_measurement() -> None:
    torch.set_num_threads(1)
    cfg, seq = small(), 128
    runs = {
        ac: measure_train_peak(cfg, seq_len=seq, micro_batch_size=2, activation_checkpoint=ac, steps=2)
        for ac in ("none", "full")
    }
    est = {
        ac: estimate_memory(
            model_args(cfg), seq, Layout(micro_batch_size=2, activation_checkpoint=ac), precision="fp32"
        ).total
        for ac in runs
    }
    saved_measured, saved_est = runs["none"] - runs["full"], est["none"] - est["full"]
    assert saved_measured > 0
    assert saved_est == pytest.approx(saved_measured, rel=0.15)


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_matches_the_model(tie: bool) -> None:
    cfg = small(tie=tie)
    assert total_params(model_args(cfg)) == count_params(build_model(cfg))


def test_zero_stages_shard_states() -> None:
    """ZeRO as the native engine runs it on FSDP2 (llmtrain/parallel/data_parallel.py)."""
    args = model_args(small())
    mem = {
        z: estimate_memory(args, 64, Layout(dp_shard=4, zero_stage=z), precision="fp32") for z in (1, 2, 3)
    }
    mem[0] = estimate_memory(args, 64, Layout(dp_replicate=4), precision="fp32")
    z1_accum = estimate_memory(args, 64, Layout(dp_shard=4, zero_stage=1), precision="fp32", grad_accum=2)
    p = mem[0].params_local
    assert (mem[0].weights, mem[0].grads, mem[0].optimizer) == (4 * p, 4 * p, 8 * p)
    assert mem[0].buffers >= 4 * p  # DDP gradient buckets
    for z in (1, 2, 3):
        assert (mem[z].weights, mem[z].grads, mem[z].optimizer) == (p, p, 2 * p)
    assert z1_accum.grads == 4 * p  # ZeRO-1 accumulates full gradients between micro-batches
    assert mem[3].buffers < mem[2].buffers  # stage 2 keeps unsharded parameters through the step
    # tensor parallelism splits activations and matrices; pipelining splits layers
    one = estimate_memory(args, 64, Layout(micro_batch_size=4), precision="bf16")
    assert (
        estimate_memory(args, 64, Layout(tp=2, micro_batch_size=4), precision="bf16").activations
        < one.activations
    )
    assert estimate_memory(args, 64, Layout(pp=3, micro_batch_size=4), precision="bf16").params_local < p


LAYOUTS = [
    ["parallel=ddp"],
    ["parallel=zero1"],
    ["parallel=zero2"],
    ["parallel=zero3"],
    ["parallel=tp2"],
    ["parallel=pp2"],
    # expert parallelism: 4 of 8 experts per rank, ZeRO-3 over edp = 1
    ["parallel=ddp", "parallel.ep=2", "model=moe_tiny", "model.moe_expert_dim=96"],
    ["parallel=zero3", "parallel.ep=2", "model=moe_tiny", "model.moe_expert_dim=96"],
]
TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=160",
    "model.vocab_size=128",
    "data.seq_len=32",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.val_batches=2",
    "tracking=none",
]


def _engine_state_bytes(rank: int, world_size: int) -> list[dict[str, float]]:
    """Per layout: this rank's local bytes of parameters, gradients (at the optimizer step) and AdamW state,
    next to the planner's estimate for the rank's pipeline stage."""
    from torch.distributed.tensor import DTensor

    from llmtrain.data.loader import Batch
    from llmtrain.parallel.layout import build_dims
    from llmtrain.parallel.native import NativeEngine
    from llmtrain.plan.fit import layout_from_config
    from llmtrain.plan.memory import estimate_stage
    from llmtrain.testing import compose_config

    def nbytes(t: torch.Tensor) -> int:
        t = t._local_tensor if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    out = []
    # every engine stays referenced until the ranks leave together (tests/distributed.py tears the
    # group down): freeing an earlier layout's FSDP/pipeline tensors while gloo threads still run once
    # aborted a rank with "malloc(): unaligned tcache chunk detected" in a full-suite run
    keep = []
    for overrides in LAYOUTS:
        cfg = compose_config([*TINY, *overrides])
        dims = build_dims(cfg, world_size)
        engine = NativeEngine(cfg, dims, dims.build_mesh("cpu"), torch.device("cpu"))
        keep.append(engine)
        seen: dict[str, float] = {}
        params = {id(p): p for m in engine.modules for p in m.parameters()}.values()
        engine.optimizer.register_step_pre_hook(
            lambda *_, seen=seen, params=params: seen.update(
                grads=sum(nbytes(p.grad) for p in params if p.grad is not None)
            )
        )
        accum = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * dims.dp)
        g = torch.Generator().manual_seed(rank)
        toks = torch.randint(0, 128, (accum, 2, 33), generator=g)
        engine.train_step([Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in toks], 1e-3)
        state = engine.optimizer.state.values()
        stage = "last" if dims.pp == 1 or rank == world_size - 1 else "first"
        # at the optimizer step ZeRO-1 has reduce-scattered its gradients like ZeRO-2 (the full local
        # gradients it accumulates between micro-batches sit on FSDP's unsharded parameters, unseen here)
        est = estimate_stage(model_args(cfg.model), 32, layout_from_config(cfg, world_size), "fp32", 1, stage)
        out.append(
            {
                "layout": " ".join(overrides[:2]),
                "weights": sum(nbytes(p) for p in params),
                "grads": seen["grads"],
                "optimizer": sum(nbytes(v) for st in state for k, v in st.items() if k != "step"),
                "est_weights": est.weights,
                "est_grads": est.grads,
                "est_optimizer": est.optimizer,
            }
        )
    return out


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_estimated_states_match_the_native_engine_on_two_ranks() -> None:
    """Sharding arithmetic (ZeRO 0-3, tp, pp) against what the real engine holds on each rank."""
    from tests.distributed import run_distributed

    for rank_rows in run_distributed(_engine_state_bytes, world_size=2, timeout=170):
        for r in rank_rows:
            for key in ("weights", "grads", "optimizer"):
                assert r[key] == pytest.approx(r[f"est_{key}"], rel=0.02), (r["layout"], key, r)


def test_plan_layout_rejects_indivisible_batch() -> None:
    with pytest.raises(ValueError, match=r"trainer\.global_batch_size=6"):
        plan_layout(model_args(small()), 64, 6, Layout(dp_shard=4, micro_batch_size=1), Cluster(), "bf16")


def test_suggestions_fit_and_respect_the_cluster() -> None:
    args = model_args(
        ModelConfig(
            name="8b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336
        )
    )
    cluster = Cluster(nodes=2, gpus_per_node=8, gpu_mem_gib=80)
    plans = suggest_layouts(args, 8192, 64, cluster, "bf16", top=20)
    assert plans
    for p in plans:
        assert p.fits and p.memory.total <= 0.9 * 80 * GIB
        assert p.layout.world == 16 and p.layout.tp <= 8
        assert 64 % (p.layout.dp * p.layout.micro_batch_size) == 0
    times = [p.step_time_s for p in plans]
    assert times == sorted(times)
    # one GPU cannot hold 8B with AdamW (16 bytes/param = 120 GiB before activations)
    assert suggest_layouts(args, 8192, 64, Cluster(nodes=1, gpus_per_node=1), "bf16") == []


def test_cli_reports_and_suggests(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "plan.py"),
        "model=1b",
        "data.seq_len=2048",
        "trainer.global_batch_size=32",
        "trainer.micro_batch_size=4",
        "trainer.precision=bf16",
        "parallel=zero3",
        "--gpus",
        "8",
        "--gpu-mem",
        "80",
        "--json",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "FITS" in res.stdout and "best: parallel.dp_replicate=" in res.stdout
    report = json.loads(out.read_text())
    assert report["params"] == total_params(
        model_args(
            ModelConfig(
                name="1b",
                dim=2048,
                n_layers=16,
                n_heads=32,
                n_kv_heads=8,
                vocab_size=128256,
                ffn_dim=8192,
                tie_embeddings=True,
            )
        )
    )
    assert report["configured"]["fits"] and report["suggestions"]


def test_pipeline_schedules_and_microbatches() -> None:
    args = model_args(small())
    gpipe = estimate_memory(args, 64, Layout(pp=3, pp_schedule="gpipe", pp_microbatches=6), precision="bf16")
    one_f1b = estimate_memory(args, 64, Layout(pp=3, pp_schedule="1f1b", pp_microbatches=6), precision="bf16")
    assert gpipe.activations == pytest.approx(2 * one_f1b.activations)  # 6 in flight vs pp=3
    with pytest.raises(ValueError, match=r"parallel\.pp_microbatches=3"):
        plan_layout(args, 64, 4, Layout(pp=2, micro_batch_size=1, pp_microbatches=3), Cluster(), "bf16")
    plan = plan_layout(args, 64, 8, Layout(pp=2, micro_batch_size=1), Cluster(), "bf16")
    assert plan.layout.pp_microbatches == 8  # default: one per accumulation step, as the engine does
    compute = plan.hw_flops_per_step * (1 + 1 / 8) / (2 * 989.4e12 * 0.4)
    # pp traffic (8 micro-batches x 1 x 64 x dim, one direction per end stage) waits on NVLink; fp32:
    # autocast keeps the residual stream in fp32 unless FSDP casts the parameters to bf16
    boundary = 64 * args.dim * 4
    assert plan.comm_bytes == {"pp": 8 * boundary}
    assert plan.step_time_s == pytest.approx(compute + 8 * boundary / 360e9)


def test_communication_volume_and_links() -> None:
    """The formulas of llmtrain/plan/comm.py (checked against real traffic by bench/comm_volume.py) and
    the mesh-order rule for which groups cross nodes."""
    from llmtrain.plan.comm import comm_time_s, comm_volume

    args = model_args(small())
    p = total_params(args)
    ddp = comm_volume(args, 64, Layout(dp_replicate=8), 2, gpus_per_node=8, precision="fp32")
    assert ddp["dp"].bytes == pytest.approx(2 * 7 / 8 * p * 4) and not ddp["dp"].inter_node
    z3 = comm_volume(args, 64, Layout(dp_shard=16, zero_stage=3, param_dtype="bf16"), 2, gpus_per_node=8)
    assert z3["dp"].bytes == pytest.approx(2 * 15 / 16 * p * (2 * 2 + 4)) and z3["dp"].inter_node
    z2 = comm_volume(args, 64, Layout(dp_shard=4, zero_stage=2), 3, gpus_per_node=8)
    assert z2["dp"].bytes == pytest.approx((3 * 4 + 4) * 3 / 4 * p)
    # HSDP: shard inside the node, all-reduce the shards across the 2 nodes
    hsdp = comm_volume(args, 64, Layout(dp_replicate=2, dp_shard=8, zero_stage=3), 1, gpus_per_node=8)
    assert not hsdp["dp"].inter_node and hsdp["dp_replicate"].inter_node
    assert hsdp["dp_replicate"].bytes == pytest.approx(2 * 1 / 2 * p / 8 * 4)
    # tp: 4 collectives per layer and micro-batch (6 with full recompute) + 2, on the critical path
    tp = comm_volume(args, 64, Layout(tp=2, micro_batch_size=2), 3, gpus_per_node=8)
    act = 2 * 64 * args.dim * 2
    assert tp["tp"].bytes == pytest.approx((4 * args.n_layers + 2) * 3 * 2 * 1 / 2 * act)
    assert not tp["tp"].overlapped
    full = comm_volume(args, 64, Layout(tp=2, micro_batch_size=2, activation_checkpoint="full"), 3, 8)
    assert full["tp"].bytes == pytest.approx((6 * args.n_layers + 2) * 3 * act)
    assert comm_volume(args, 64, Layout(), 4, gpus_per_node=8) == {}  # one GPU: nothing to send
    # data-parallel traffic hides behind 2/3 of compute, the rest and all tp traffic is exposed
    total, exposed = comm_time_s(ddp, compute_s=1.0, intra_gbps=ddp["dp"].bytes / 1e9, inter_gbps=1.0)
    assert (total, exposed) == (pytest.approx(1.0), pytest.approx(1 / 3))
    total, exposed = comm_time_s(tp, compute_s=100.0, intra_gbps=tp["tp"].bytes / 1e9, inter_gbps=1.0)
    assert (total, exposed) == (pytest.approx(1.0), pytest.approx(1.0))


def test_slow_network_moves_the_best_layout_off_cross_node_zero3() -> None:
    """With a slow inter-node link, a ZeRO-3 layout sharded across 2 nodes pays for it in step time,
    and an HSDP or intra-node layout wins; with the network free, the difference disappears."""
    args = model_args(
        ModelConfig(
            name="1b", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=8192
        )
    )
    flat = Layout(dp_shard=16, zero_stage=3, param_dtype="bf16", micro_batch_size=4)
    slow = Cluster(nodes=2, gpus_per_node=8, inter_node_gbps=5.0)
    fast = Cluster(nodes=2, gpus_per_node=8, inter_node_gbps=1e9, intra_node_gbps=1e9)
    assert plan_layout(args, 2048, 64, flat, slow, "bf16").step_time_s > 1.5 * (
        plan_layout(args, 2048, 64, flat, fast, "bf16").step_time_s
    )
    best = suggest_layouts(args, 2048, 64, slow, "bf16", top=1)[0]
    assert (
        best.layout.dp_shard < 16
        and best.comm_exposed_s < plan_layout(args, 2048, 64, flat, slow, "bf16").comm_exposed_s
    )


def run_plan(*argv: str, json_out: Path) -> tuple[str, dict]:
    """tools/plan.py in a real subprocess; (stdout, its --json report)."""
    cmd = [sys.executable, str(ROOT / "tools" / "plan.py"), *argv, "--json", str(json_out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout, json.loads(json_out.read_text())


# 8B by hand: block matrices 4096*4096*2 (q, o) + 2*4096*1024 (k, v) + 3*4096*14336 (SwiGLU) =
# 218,103,808; forward per token at seq 256 = 32 * (2 * 218,103,808 + 4 * 256 * 4096) + head
# 2 * 4096 * 128,256 = 15,143,534,592; training = 3x; a step = 32 x 256 tokens.
FLOPS_8B_STEP = 3 * 15_143_534_592 * 32 * 256


# 8,030,261,248 parameters (32 x (218,103,808 + 2 x 4096) + 2 x 128,256 x 4096 + 4096); ZeRO-3 on 8
# GPUs, one micro-batch: fp32 gather fwd + bwd + reduce-scatter = 12 x 7/8 bytes per parameter.
ZERO3_8B_S = 12 * 7 / 8 * 8_030_261_248 / 360e9  # 0.234 s on NVLink


@pytest.mark.parametrize(
    "extra,peak,compute",
    [
        ([], 67.0, FLOPS_8B_STEP / (8 * 67e12 * 0.4)),  # fp32, TF32 off: 1.736 s, not 0.12 s
        (["--tf32"], 494.7, FLOPS_8B_STEP / (8 * 494.7e12 * 0.4)),  # 0.235 s
        (["trainer.precision=bf16"], 989.4, FLOPS_8B_STEP / (8 * 989.4e12 * 0.4)),  # 0.118 s
    ],
)
def test_step_time_uses_the_peak_of_the_running_precision(
    tmp_path: Path, extra: list[str], peak: float, compute: float
) -> None:
    out, report = run_plan("model=8b", "parallel=zero3", "--gpus", "8", *extra, json_out=tmp_path / "p.json")
    assert report["peak_tflops"] == peak
    assert report["params"] == 8_030_261_248
    assert pytest.approx(3.7217e14, rel=1e-4) == FLOPS_8B_STEP
    exposed = max(0.0, ZERO3_8B_S - 2 / 3 * compute)  # hidden behind the fp32 backward, not the bf16 one
    assert report["configured"]["step_time_s"] == pytest.approx(compute + exposed, rel=1e-9)
    assert (BF16_NOTE in out) == ("trainer.precision=bf16" in extra)


BF16_NOTE = "weights, gradients and AdamW state stay fp32"


def test_zero3_reduce_bytes_follow_reduce_dtype(tmp_path: Path) -> None:
    """70B ZeRO-3 on 64 GPUs, bf16 parameters: per rank all-gather fwd + bwd (2 x 2 bytes) and a
    reduce-scatter (reduce_dtype bytes) of 63/64 of the 70,553,706,496 parameters (80 blocks of
    855,654,400 + untied embedding and head 2 x 128,256 x 8192 + final norm 8192)."""
    p70 = 80 * 855_654_400 + 2 * 128_256 * 8192 + 8192
    common = ["model=70b", "parallel=zero3", "parallel.param_dtype=bf16", "trainer.precision=bf16"]
    common += ["--gpus", "8", "--nodes", "8"]
    _, bf16 = run_plan(*common, "parallel.reduce_dtype=bf16", json_out=tmp_path / "a.json")
    _, fp32 = run_plan(*common, json_out=tmp_path / "b.json")
    assert bf16["params"] == p70
    assert bf16["configured"]["comm_bytes"]["dp"] == pytest.approx((2 + 2 + 2) * 63 / 64 * p70)  # 416.7 GB
    assert fp32["configured"]["comm_bytes"]["dp"] == pytest.approx((2 + 2 + 4) * 63 / 64 * p70)  # 555.6 GB
    assert round(bf16["configured"]["comm_bytes"]["dp"] / 1e9, 1) == 416.7


def test_fit_batch_suggests_instead_of_refusing() -> None:
    from llmtrain.plan.batch import fit_batch

    # 32 sequences on dp 8 with micro-batch 8 do not split: micro-batch 4 keeps the batch
    fit = fit_batch(32, 8, 8, dp=8, pp=1, pp_microbatches=None)
    assert (fit.global_batch_size, fit.micro_batch_size, fit.val_batches) == (32, 4, 8)
    assert "trainer.micro_batch_size=4" in fit.notes[0] and "trainer.global_batch_size=64" in fit.notes[0]
    # 32 on dp 64: no micro-batch keeps it; the smallest legal batch is 64 x 1
    fit = fit_batch(32, 8, 8, dp=64, pp=1, pp_microbatches=None)
    assert (fit.global_batch_size, fit.micro_batch_size) == (64, 1)
    # pp 2 on dp 16: micro-batch 1 gives 2 pipeline micro-batches; keeping micro-batch 8 needs 256
    fit = fit_batch(32, 8, 8, dp=16, pp=2, pp_microbatches=None)
    assert (fit.global_batch_size, fit.micro_batch_size) == (32, 1)
    assert "trainer.global_batch_size=256" in fit.notes[0]
    # 3d: 64 sequences, micro-batch 1, dp 4 -> 16 pipeline micro-batches; 4 val rows must become 16
    fit = fit_batch(64, 1, 4, dp=4, pp=2, pp_microbatches=None)
    assert (fit.global_batch_size, fit.micro_batch_size, fit.val_batches) == (64, 1, 16)
    assert "trainer.val_batches=16" in fit.notes[0]
    # micro-batch 2 into 6 pipeline micro-batches: val rows 2 x vb divisible by 6 -> vb = 3
    assert fit_batch(48, 2, 1, dp=4, pp=2, pp_microbatches=6).val_batches == 3
    assert fit_batch(32, 4, 8, dp=8, pp=1, pp_microbatches=None).notes == []  # legal: unchanged


def readme_plan_commands() -> list[list[str]]:
    """Every `python tools/plan.py ...` command in README.md, continuation lines joined, comments cut."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    cmds = re.findall(r"^python tools/plan\.py[^\n]*", text, flags=re.MULTILINE)
    return [shlex.split(c.split("#")[0])[2:] for c in cmds]


def test_readme_planner_commands_run_as_written(tmp_path: Path) -> None:
    cmds = readme_plan_commands()
    assert len(cmds) == 2
    for i, argv in enumerate(cmds):
        out, report = run_plan(*argv, json_out=tmp_path / f"{i}.json")
        assert "configured" in report and "not valid" not in out, out
        assert report["suggestions"], out
    assert any("trainer.micro_batch_size=4 (keeps the batch)" in n for n in report["batch_notes"])


def test_3d_layout_is_estimated_with_a_fitting_val_batches(tmp_path: Path) -> None:
    argv = ["model=8b", "parallel=3d", "trainer.micro_batch_size=1", "trainer.global_batch_size=64"]
    out, report = run_plan(*argv, "--gpus", "8", "--nodes", "2", json_out=tmp_path / "p.json")
    assert report["configured"]["layout"].startswith("dp1x4 tp2 pp2")
    assert report["batch"]["val_batches"] == 16 and "trainer.val_batches=16" in out


def test_context_parallel_in_memory_comm_and_suggestions() -> None:
    """cp divides the per-token activations (plus the gathered K/V), adds the K/V all-gather and its
    reduce-scatter to the critical path, and is what fits a llama-8b at 128k (conf/model/8b_128k)."""
    from llmtrain.plan.comm import comm_volume
    from llmtrain.testing import compose_config

    args = model_args(small())
    seq, q, kv = 256, args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    one, two = (estimate_memory(args, seq, Layout(cp=c), precision="fp32") for c in (1, 2))
    # activations: half the tokens, plus the other half's repeated K/V and the gathered kv copy
    gathered = args.n_layers * 4 * seq * (2 * q / 2 + 2 * kv)
    assert two.activations == pytest.approx(one.activations / 2 + gathered)
    assert two.loss == pytest.approx(one.loss / 2)
    cp = comm_volume(args, seq, Layout(cp=4, micro_batch_size=2), 3, gpus_per_node=8, precision="fp32")
    kv_bytes = 2 * seq * 2 * kv * 4
    assert cp["cp"].bytes == pytest.approx(2 * args.n_layers * 3 * 3 / 4 * kv_bytes)
    assert cp["dp"].bytes == pytest.approx(2 * 3 / 4 * total_params(args) * 4)  # grads over dp x cp
    assert not cp["cp"].overlapped
    for name, seq_len, nodes in (("8b_32k", 32768, 1), ("8b_128k", 131072, 2)):
        cfg = compose_config([f"model={name}", f"data.seq_len={seq_len}", "tracking=none"])
        fits = suggest_layouts(model_args(cfg.model), seq_len, 16, Cluster(nodes=nodes), "bf16", top=100)
        cps = [p.layout.cp for p in fits]
        assert any(c > 1 for c in cps), (name, [p.layout.describe() for p in fits])
    assert fits and all(c > 1 for c in cps), "at 128k only context-parallel layouts fit"
    # ZeRO shards over dp_shard x cp (FSDP2 on the flattened mesh), so cp2 alone halves the states
    z3 = estimate_memory(args, seq, Layout(cp=2, zero_stage=3), precision="fp32")
    assert z3.optimizer == pytest.approx(one.optimizer / 2) and z3.weights == pytest.approx(one.weights / 2)
    zc = comm_volume(args, seq, Layout(cp=2, zero_stage=3), 1, gpus_per_node=8, precision="fp32")
    assert zc["dp"].bytes == pytest.approx(3 * 1 / 2 * total_params(args) * 4)
