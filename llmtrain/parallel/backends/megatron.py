"""megatron-core engine: our presets as megatron's GPTModel, its TP/PP schedules and DDP.

Process groups come from the same ParallelDims: megatron's default rank order ("tp-cp-ep-dp-pp", tp
fastest) is our mesh order (pp, dp_replicate, dp_shard, tp), which `_check_rank_layout` verifies.
Weights start from our layout-independent native init, converted by `llmtrain.checkpoint.megatron_format` (so every
engine starts from the same weights and users can move checkpoints between engines).

Loss math as in `llmtrain.parallel.step`: megatron's per-token-loss mode (`calculate_per_token_loss`)
backpropagates each micro-batch's *summed* token loss, its DDP then sums (not averages) gradients over
dp, and `finalize_model_grads` divides by the global target-token count of the step: dL/dw of the
token-weighted global mean. Clipping: global L2 norm over tp/pp with tensor-parallel duplicates (norm
weights) and the tied-embedding copy counted once, as megatron's optimizer does.

CUDA only, except under the test shim (tests/engines/megatron_cpu_shim.py, see docs/engines.md):
megatron-core 0.16 allocates buffers on `torch.cuda.current_device()` and forks the CUDA RNG. Sequence
parallelism needs CUDA (apex/TransformerEngine norms) and is refused on CPU; the DistributedOptimizer
(zero_stage >= 1) is refused everywhere until it can be wired and tested on a GPU.
"""

import math
from pathlib import Path

import megatron.core
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import param_is_not_shared
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.checkpoint.megatron_format import (
    chunk_layers,
    from_megatron,
    to_megatron,
    tp_concat_dim,
)
from llmtrain.config import Config, batch_geometry
from llmtrain.config.errors import ConfigError
from llmtrain.data.loader import IGNORE_INDEX, Batch
from llmtrain.distributed.collectives import all_reduce_, gather_objects
from llmtrain.models import build_model, model_args
from llmtrain.parallel.backends.native_io import is_native_checkpoint, read_native_weights
from llmtrain.parallel.dims import ParallelDims
from llmtrain.parallel.engine import Engine
from llmtrain.parallel.step import SkipWhen, StepResult, global_tokens

CPU_REASON = (
    "megatron-core 0.16 is CUDA-only: it allocates buffers on torch.cuda.current_device() and forks the "
    "CUDA RNG in attention"
)


def check_supported(cfg: Config, dims: ParallelDims, device: torch.device) -> None:
    """Refuse what this engine cannot run, naming the key and the reason."""
    p = cfg.parallel
    if cfg.data.document_mask:
        raise ConfigError(
            "data.document_mask=true is not supported by parallel.backend=megatron "
            "(its packed-sequence attention needs TransformerEngine); use backend=native"
        )
    if dims.dp_shard_enabled:
        raise ConfigError(
            "parallel.dp_shard>1 with backend=megatron: it shards only through its distributed "
            "optimizer (not available, see zero_stage); use dp_replicate for data parallel"
        )
    if p.zero_stage >= 1:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} with backend=megatron: its DistributedOptimizer "
            "is not wired into llmtrain yet (it needs CUDA tensors in its buffers and clipping, "
            "so it cannot be tested on CPU); use zero_stage=0, or backend=deepspeed/native for ZeRO"
        )
    if p.pp_schedule not in ("1f1b", "interleaved_1f1b") and dims.pp_enabled:
        raise ConfigError(f"parallel.pp_schedule={p.pp_schedule}: megatron runs 1f1b and interleaved_1f1b")
    if p.pp_layers_per_stage is not None:
        raise ConfigError("parallel.pp_layers_per_stage: megatron splits layers evenly; leave it null")
    # even layer split and tp | vocab: config/rules.py (pp_layers_per_stage=null splits evenly)
    if device.type == "cuda":
        return
    if dims.tp_enabled and p.sequence_parallel:
        raise ConfigError(
            "parallel.sequence_parallel=true with backend=megatron needs CUDA (apex or "
            "TransformerEngine layer norms); set parallel.sequence_parallel=false on CPU"
        )
    if cfg.trainer.precision != "fp32":
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} with backend=megatron needs CUDA on CPU"
        )
    if not getattr(megatron.core, "_llmtrain_cpu_shim", False):
        raise ConfigError(f"parallel.backend=megatron needs a GPU: {CPU_REASON}. Use backend=native on CPU")


def transformer_config(cfg: Config, dims: ParallelDims, device: torch.device) -> TransformerConfig:
    """Our model preset and layout as megatron's TransformerConfig (Llama: RMSNorm, SwiGLU, GQA)."""
    a, p = model_args(cfg.model), cfg.parallel
    bf16 = cfg.trainer.precision == "bf16"
    return TransformerConfig(
        num_layers=a.n_layers,
        hidden_size=a.dim,
        num_attention_heads=a.n_heads,
        num_query_groups=a.kv_heads,
        kv_channels=a.head_dim,
        ffn_hidden_size=a.hidden_dim,
        normalization="RMSNorm",
        layernorm_epsilon=a.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=a.init_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=p.pp_virtual_stages if p.pp_virtual_stages > 1 else None,
        sequence_parallel=dims.tp_enabled and p.sequence_parallel,
        use_cpu_initialization=device.type == "cpu",
        pipeline_dtype=torch.float32,
        enable_autocast=bf16,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        calculate_per_token_loss=True,
        batch_p2p_sync=device.type == "cuda",
        # gloo matches point-to-point messages by (peer, tag) only: a batched send+recv of an activation and
        # a gradient of the same shape to one peer (interleaved 1F1B) can land in swapped buffers.
        batch_p2p_comm=device.type == "cuda",
    )


def _check_rank_layout(dims: ParallelDims) -> None:
    want = dims.coords(dist.get_rank())
    got = {
        "tp": parallel_state.get_tensor_model_parallel_rank(),
        "pp": parallel_state.get_pipeline_model_parallel_rank(),
        "dp": parallel_state.get_data_parallel_rank(),
    }
    assert all(want[k] == v for k, v in got.items()), f"megatron rank layout {got} != ParallelDims {want}"


def _no_decay(model_args_tied: bool, name: str, p: torch.Tensor) -> bool:
    """Our rule (llmtrain.optim.param_groups): no decay on 1-D params and on embeddings."""
    return p.ndim < 2 or "word_embeddings" in name or (model_args_tied and "output_layer" in name)


def _local_state(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = chunk.module if isinstance(chunk, DistributedDataParallel) else chunk
    return {k: v for k, v in inner.state_dict().items() if "_extra_state" not in k}


class MegatronEngine(Engine):
    """GPTModel chunks (one, or pp_virtual_stages for interleaved 1F1B) wrapped in megatron's DDP."""

    kind = "megatron"

    def __init__(
        self, cfg: Config, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device
    ) -> None:
        check_supported(cfg, dims, device)
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
            )
        self.cfg, self.dims, self.device = cfg, dims, device
        self.skip_when: SkipWhen | None = None
        self.args = model_args(cfg.model)
        self.grad_accum = batch_geometry(cfg, dims.dp)
        vp = cfg.parallel.pp_virtual_stages if dims.pp_enabled else 1
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()  # megatron keeps its groups in module globals
        timeout_min = max(1, math.ceil(cfg.resilience.pg_timeout_s / 60))  # its own groups: not its 30 min
        parallel_state.initialize_model_parallel(
            dims.tp, dims.pp, vp if vp > 1 else None, distributed_timeout_minutes=timeout_min
        )
        _check_rank_layout(dims)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.trainer.seed)
        self.config = transformer_config(cfg, dims, device)
        self.config.finalize_model_grads_func = finalize_model_grads
        native = build_model(cfg.model, "cpu")
        native.init_weights(cfg.trainer.seed)
        full = native.state_dict()
        self.chunk_layers: list[list[int]] = []
        self.modules = [self._build_chunk(v, vp, full) for v in range(vp)]
        self.dp_group = parallel_state.get_data_parallel_group() if dims.dp_enabled else None
        named = [(n, p) for m in self.modules for n, p in m.named_parameters() if p.requires_grad]
        tied = self.args.tie_embeddings
        groups = [
            {
                "params": [p for n, p in named if not _no_decay(tied, n, p)],
                "weight_decay": cfg.optim.weight_decay,
            },
            {"params": [p for n, p in named if _no_decay(tied, n, p)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            foreach=False,
        )

    def _build_chunk(self, v: int, vp: int, full: dict[str, torch.Tensor]) -> torch.nn.Module:
        vp_stage = v if vp > 1 else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = GPTModel(
            self.config,
            get_gpt_layer_local_spec(normalization="RMSNorm"),
            self.args.vocab_size,
            self.args.max_seq_len,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=self.args.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(self.args.rope_theta),
            vp_stage=vp_stage,
        )
        layers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        assert layers == chunk_layers(self.args.n_layers, self.dims.pp, vp, pp_rank, v), (
            layers
        )  # offline tool
        self.chunk_layers.append(layers)
        self._load_chunk(chunk, layers, full)
        chunk.to(self.device)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        )
        return DistributedDataParallel(self.config, ddp_cfg, chunk)

    def _load_chunk(self, chunk: torch.nn.Module, layers: list[int], full: dict[str, torch.Tensor]) -> None:
        """This rank's TP shard of the chunk's layers from full native weights."""
        pre, post = chunk.pre_process, chunk.post_process
        local = to_megatron(
            full,
            self.args,
            layers,
            pre_process=pre,
            post_process=post,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp=self.dims.tp,
        )
        expected = _local_state(chunk)
        local = {k: v for k, v in local.items() if k in expected}  # tied pp=1: no output_layer weight
        missing = set(expected) - set(local)
        assert not missing, f"conversion did not produce {sorted(missing)}"
        chunk.load_state_dict(local, strict=False)

    def _forward_step(self, data_iterator, model):
        batch: Batch = next(data_iterator)
        tokens = batch.inputs.to(self.device)
        targets = batch.targets.to(self.device)
        mask = (targets != IGNORE_INDEX).float()
        positions = torch.arange(tokens.shape[1], device=self.device).unsqueeze(0).expand_as(tokens)
        out = model(tokens, positions, None, labels=targets.clamp(min=0))

        def loss_func(per_token: torch.Tensor):
            loss_sum = (per_token.float() * mask).sum()
            n = mask.sum().to(torch.int)
            return loss_sum, n, {"loss_sum": loss_sum.detach().double()}

        return out, loss_func

    def _run(self, batches: list[Batch], forward_only: bool) -> float:
        """Schedule over the micro-batches; returns this dp rank's summed token loss (on every pp rank)."""
        for m in self.modules:
            m.train(not forward_only)
        iters = [iter(batches) for _ in self.modules]
        results = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.modules if len(self.modules) > 1 else self.modules[0],
            num_microbatches=len(batches),
            seq_length=batches[0].inputs.shape[1],
            micro_batch_size=batches[0].inputs.shape[0],
            forward_only=forward_only,
        )
        total = torch.zeros((), dtype=torch.float64)
        if parallel_state.is_pipeline_last_stage():
            total += sum(float(r["loss_sum"]) for r in results)
        if self.dims.pp_enabled:
            all_reduce_(total, parallel_state.get_pipeline_model_parallel_group())
        return float(total)

    def train_step(self, batches: list[Batch], lr: float) -> StepResult:
        if len(batches) != self.grad_accum:
            raise ValueError(f"megatron engine got {len(batches)} micro-batches, expected {self.grad_accum}")
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        for m in self.modules:
            m.zero_grad_buffer()
        n_global = global_tokens(batches, self.dp_group)
        loss_sum = torch.tensor(self._run(batches, forward_only=False), dtype=torch.float64)
        all_reduce_(loss_sum, self.dp_group)
        grad_norm = self._clip_main_grads(self.cfg.optim.grad_clip)
        loss = float(loss_sum) / max(n_global, 1)
        # loss (all-reduced over dp, and pp in _run) and norm (over tp x pp of dp-reduced grads) are
        # identical on every rank: all skip the same step, with no collective of their own
        skipped = self.skip_when is not None and self.skip_when(loss, grad_norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # main_grad buffers are zeroed at the next step
        return StepResult(loss, grad_norm, n_global, skipped=skipped)

    def set_skip_when(self, skip_when: SkipWhen | None) -> bool:
        """Our torch AdamW runs the update (not megatron's optimizer), so skipping it is the whole skip:
        weights, Adam moments and step counts stay; the gradients are dropped."""
        self.skip_when = skip_when
        return True

    def _clip_main_grads(self, max_norm: float) -> float:
        """Move megatron's reduced main_grad into .grad, clipped by the global norm over tp x pp."""
        params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        sq = torch.zeros((), dtype=torch.float64)
        for p in params:
            p.grad = p.main_grad.to(p.dtype)
            if param_is_not_shared(p) and tensor_parallel.param_is_not_tensor_parallel_duplicate(p):
                sq += p.grad.double().pow(2).sum().cpu()
        if self.dims.tp_enabled or self.dims.pp_enabled:
            all_reduce_(sq, parallel_state.get_model_parallel_group())
        norm = float(sq.sqrt())
        if max_norm > 0 and norm > max_norm:
            coef = max_norm / (norm + 1e-6)
            for p in params:
                p.grad.mul_(coef)
        return norm

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        total = torch.tensor(
            [self._run(batches, forward_only=True), sum(b.num_tokens for b in batches)], dtype=torch.float64
        )
        all_reduce_(total, self.dp_group)
        return float(total[0] / total[1].clamp(min=1))

    # --- checkpoints: one tensors-only file per (tp, pp) coordinate, written by dp rank 0 -----------
    def _file(self, folder: Path) -> Path:
        c = self.dims.coords(dist.get_rank())
        return (
            Path(folder)
            / f"megatron_tp{c['tp']:02d}-of-{self.dims.tp:02d}_pp{c['pp']:02d}-of-{self.dims.pp:02d}.pt"
        )

    def _named_params(self) -> dict[str, torch.nn.Parameter]:
        return {
            f"chunk{i}.{n}": p for i, m in enumerate(self.modules) for n, p in m.module.named_parameters()
        }

    def save(self, folder: Path) -> None:
        """Model + AdamW state of this (tp, pp) shard; tensors only, loaded with weights_only=True."""
        if parallel_state.get_data_parallel_rank() != 0:
            return
        state: dict[str, torch.Tensor] = {}
        for name, p in self._named_params().items():
            state["model." + name] = p.detach().cpu()
            for k, v in self.optimizer.state.get(p, {}).items():
                state[f"optim.{name}.{k}"] = v.detach().cpu() if torch.is_tensor(v) else torch.tensor(v)
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, self._file(folder))

    def load(self, folder: Path, *, load_optimizer: bool = True) -> None:
        """Our per-(tp, pp) files of the same layout; or a native checkpoint's weights (any layout)."""
        if is_native_checkpoint(folder):
            full = read_native_weights(folder)
            with torch.no_grad():
                for chunk, layers in zip(self.modules, self.chunk_layers):
                    self._load_chunk(chunk.module, layers, full)
            return
        path = self._file(folder)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no megatron shard for this tp/pp layout (saved under another "
                "layout? convert with tools/to_native.py)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, p in self._named_params().items():
                p.copy_(state["model." + name])
                if load_optimizer:
                    keys = [k for k in state if k.startswith(f"optim.{name}.")]
                    if keys:
                        self.optimizer.state[p] = {
                            k.rsplit(".", 1)[1]: state[k].to(self.device) for k in keys
                        }

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Native-named full weights (TP shards gathered, pipeline stages merged); collective."""
        out: dict[str, torch.Tensor] = {}
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for chunk, layers in zip(self.modules, self.chunk_layers):
            full = {}
            for name, t in _local_state(chunk).items():
                dim = tp_concat_dim(name)
                if dim is None or self.dims.tp == 1:
                    full[name] = t.detach().cpu().clone()
                    continue
                parts = [torch.empty_like(t) for _ in range(self.dims.tp)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                full[name] = torch.cat([x.cpu() for x in parts], dim)
            out.update(from_megatron(full, self.args, layers, tp=self.dims.tp))
        if self.dims.pp_enabled:
            gathered = gather_objects(
                {k: v.numpy() for k, v in out.items()}, parallel_state.get_pipeline_model_parallel_group()
            )
            out = {k: torch.from_numpy(v) for part in gathered for k, v in part.items()}
        return out
