"""DeepSpeed engine: ZeRO 0/1/2/3 (+ CPU/NVMe offload), bf16, accumulation and clipping by DeepSpeed.

What stays ours: ranks (torchrun or SLURM, never the `deepspeed` launcher), the model and its
layout-independent init, the data loader, the LR schedule (set on the optimizer every step), the loss
math of `llmtrain.parallel.step` and the checkpoint layout (DeepSpeed writes its files into the folder our
checkpoint manager hands us, inside its atomic tmp -> rename -> COMPLETE protocol).

Loss math. step.py backpropagates  sum(ce over a micro-batch) * dp / N  (N = global target tokens of
the step) and lets data parallelism *average* the gradients. DeepSpeed also averages over dp, and by
default divides the loss by gradient_accumulation_steps; we call `backward(..., scale_wrt_gas=False)` so
the gradient is exactly dL/dw of the token-weighted global mean, whatever the micro-batch token counts.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must be set before deepspeed is imported: its accelerator is chosen at import time.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.checkpoint.folder import staged_by_rank0
from llmtrain.checkpoint.formats import DEEPSPEED_TAG, deepspeed_weights
from llmtrain.config import Config, batch_geometry
from llmtrain.config.errors import ConfigError
from llmtrain.data.loader import Batch
from llmtrain.distributed.collectives import all_reduce_
from llmtrain.models import build_model
from llmtrain.models.build import count_params
from llmtrain.models.llama import Transformer, rope_tables
from llmtrain.optim import param_groups
from llmtrain.parallel.backends.ds_config import deepspeed_config
from llmtrain.parallel.backends.ds_skip import StepGate
from llmtrain.parallel.backends.native_io import is_native_checkpoint, read_native_weights
from llmtrain.parallel.dims import ParallelDims
from llmtrain.parallel.engine import Engine
from llmtrain.parallel.step import SkipWhen, StepResult, global_tokens, token_loss_sum

CKPT_TAG = (
    DEEPSPEED_TAG  # one constant: llmtrain.checkpoint.formats reads these files without DeepSpeed's engine
)


def _never(loss: float, grad_norm: float) -> bool:
    return False


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce op (`deepspeed_shm_comm`,
    ~25 s of g++ on first start, needs a compiler at run time). We communicate through torch's gloo
    group anyway, so make the op builder return None, which DeepSpeed treats as "op unavailable"
    (see docs/development.md). Only relevant on the CPU accelerator."""
    mod = sys.modules.get("deepspeed.comm.torch")
    if mod is not None and hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None


def _ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs torch.distributed even on one process; the launcher only creates it for > 1."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # read by deepspeed.initialize (torchrun sets it)
    if device.type == "cpu":
        _skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)


def saved_zero_layout(tag_dir: Path) -> tuple[int | None, bool]:
    """(data-parallel ranks that wrote a ZeRO 1-3 checkpoint, whether it is ZeRO-3), from its file names:
    one optimizer shard per rank, and per-rank model files only under ZeRO-3. None ranks for ZeRO-0,
    whose optimizer state is whole and loads under any world size."""
    ranks = len(list(tag_dir.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"))) or None
    return ranks, any(tag_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))


def to_universal(tag_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's `ds_to_universal` conversion, in-process and single-worker (no process pool inside a
    training rank). Writes to a temporary name and renames, so a killed conversion is never loaded."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our saves carry no Megatron-DeepSpeed client state
    )
    with contextlib.redirect_stdout(sys.stderr):  # its progress output is not our console line
        ds_to_universal.main(args)
    tmp.rename(out_dir)


def build_partitioned(cfg: Config, ds_config: dict, device: torch.device) -> Transformer:
    """ZeRO-3: construct the model under `deepspeed.zero.Init`, so each module's parameters are
    partitioned as soon as the module exists and no rank ever holds the whole model (a 70B model does
    not fit one GPU or one host), then initialize it with the layout-independent rule, one gathered
    parameter at a time, drawn on rank 0 and broadcast: the same weights as any other layout."""
    from llmtrain.models.init import fill_param

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(cfg.model, device)
    model.rope = rope_tables(
        model.args.head_dim, model.args.max_seq_len, model.args.rope_theta, device=device
    )
    first = dist.get_rank() == 0
    with torch.no_grad():
        for name, p, draw, seed in model.init_plan(cfg.trainer.seed):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if first:
                    fill_param(p, draw, seed=seed, name=name)
    return model


class DeepSpeedEngine(Engine):
    """Our Transformer wrapped by `deepspeed.initialize` with a torch AdamW and a generated config."""

    kind = "deepspeed"

    def __init__(
        self, cfg: Config, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device
    ) -> None:
        if dims.tp_enabled or dims.pp_enabled:
            raise ConfigError(
                f"parallel.backend=deepspeed runs data parallel / ZeRO only (got {dims.describe()}); "
                "use parallel.backend=native or megatron for tp/pp"
            )
        if dims.dp_replicate_enabled and dims.dp_shard_enabled:
            raise ConfigError(
                f"parallel.backend=deepspeed shards ZeRO over all {dims.dp} data-parallel ranks; set "
                f"parallel.dp_replicate=1 or parallel.dp_shard=1 (got {dims.describe()})"
            )
        self.cfg, self.dims, self.device = cfg, dims, device
        self.grad_accum = batch_geometry(cfg, dims.dp)
        _ensure_process_group(device)
        # tp = pp = 1 here, so data parallel is the whole world (no mesh needed: DeepSpeed uses it too)
        self.dp_group = dist.group.WORLD if dims.dp_enabled else None
        self.ds_config = deepspeed_config(cfg, dims.dp, self.grad_accum, count_params(build_model(cfg.model)))
        self._write_config()
        if self.ds_config["zero_optimization"]["stage"] == 3:
            model = build_partitioned(cfg, self.ds_config, device)
        else:
            model = build_model(cfg.model, device)
            model.init_weights(cfg.trainer.seed, buffer_device=device)
        # A torch optimizer (not DeepSpeed's fused CPU Adam): identical update rule to the native engine.
        base = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            foreach=False,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=base, config=self.ds_config, dist_init_required=False
        )
        self.base_optimizer = base
        self.gate = StepGate(self.engine, base, _never)
        self.model = self.engine.module
        if self.engine.bfloat16_enabled():  # bf16 params, but keep the RoPE table exact
            self.model.rope = self.model.rope.float()
        self.modules = [self.model]

    def _write_config(self) -> None:
        """The generated JSON, next to the resolved config, so users see exactly what DeepSpeed got."""
        if dist.get_rank() == 0:
            run_dir = Path(self.cfg.run.root) / self.cfg.run.name
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")

    def _forward_loss_sum(self, batch: Batch) -> torch.Tensor:
        logits = self.engine(batch.inputs, positions=batch.positions, attn_mask=batch.attn_mask)
        return token_loss_sum(logits, batch.targets)

    def set_skip_when(self, skip_when: SkipWhen | None) -> bool:
        """Every ZeRO stage and precision can skip: the gate sits on the torch optimizer (ds_skip.py)."""
        self.gate.skip_when = skip_when or _never
        return True

    def train_step(self, batches: list[Batch], lr: float) -> StepResult:
        if len(batches) != self.grad_accum:
            raise ValueError(
                f"deepspeed engine got {len(batches)} micro-batches, its config says "
                f"gradient_accumulation_steps={self.grad_accum}"
            )
        for g in self.base_optimizer.param_groups:
            g["lr"] = lr
        self.gate.begin()
        n_global = global_tokens(batches, self.dp_group)
        scale = self.dims.dp / max(n_global, 1)  # see the module docstring
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(batches):
            loss = self._forward_loss_sum(batch)
            self.engine.backward(loss * scale, scale_wrt_gas=False)
            loss_sum += loss.detach().double().cpu()
            if i < len(batches) - 1:
                self.engine.step()  # a no-op before the accumulation boundary
        all_reduce_(loss_sum, self.dp_group)  # before the boundary step: the gate needs the loss
        mean = float(loss_sum) / max(n_global, 1)
        if self.ds_config["zero_optimization"]["stage"] == 0:  # whole, reduced gradients: our norm
            plain = self._plain_grad_norm()  # (ZeRO-0 does not report one)
            self.gate.arm(mean, lambda: plain)
        else:  # the ZeRO wrapper computes the global norm inside its step, before the optimizer's
            self.gate.arm(mean, lambda: float(self.engine.optimizer._global_grad_norm))
        self.engine.step()  # the boundary: clip + AdamW step, unless the gate skips the AdamW step
        grad_norm, skipped = self.gate.finish()
        return StepResult(mean, grad_norm, n_global, skipped=skipped)

    def _plain_grad_norm(self) -> float:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads, foreach=False))

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            totals[0] += self._forward_loss_sum(batch).double().cpu()
            totals[1] += batch.num_tokens
        self.engine.train()
        all_reduce_(totals, self.dp_group)
        return float(totals[0] / totals[1].clamp(min=1))

    def save(self, folder: Path) -> None:
        """DeepSpeed's own sharded format (model states + one ZeRO shard per rank) inside our folder."""
        self.engine.save_checkpoint(str(folder), tag=CKPT_TAG, save_latest=False)

    def load(self, folder: Path, *, load_optimizer: bool = True) -> None:
        """Resume DeepSpeed's own checkpoint; a native checkpoint loads its weights only.

        ZeRO 1-3 optimizer state is sharded per data-parallel rank. When the checkpoint was written by
        another number of ranks, it goes through DeepSpeed's universal checkpoint (per-parameter fp32
        master, exp_avg, exp_avg_sq), which DeepSpeed re-partitions for this world size, so a run
        moves to more or fewer GPUs without losing its Adam moments."""
        if is_native_checkpoint(folder):
            self._load_native(read_native_weights(folder))
            return
        saved_dp, saved_stage3 = saved_zero_layout(folder / CKPT_TAG)
        stage = self.ds_config["zero_optimization"]["stage"]
        if saved_dp is not None and saved_stage3 != (stage == 3):
            saved = "3" if saved_stage3 else "1 or 2"
            raise ConfigError(
                f"{folder}: a ZeRO-{saved} checkpoint cannot load under parallel.zero_stage={stage} (DeepSpeed "
                f"keeps ZeRO-3 and ZeRO-1/2 states in different layouts); resume with parallel.zero_stage={saved}"
            )
        if not load_optimizer and saved_stage3:
            # DeepSpeed's own ZeRO-3 module-only load looks for a `latest` file we never write; gather the
            # fp32 weights from the shards (any world size) instead
            self._load_native(deepspeed_weights(folder))
            return
        # ZeRO 1/2 keep whole weights in one file, which DeepSpeed loads under any world size by itself
        if load_optimizer and saved_dp is not None and saved_dp != self.dims.dp:
            self._load_resharded(folder, saved_dp)
            return
        path, _ = self.engine.load_checkpoint(
            str(folder),
            tag=CKPT_TAG,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=False,
            load_module_only=not load_optimizer,
        )
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint (tag {CKPT_TAG!r})")

    def _load_resharded(self, folder: Path, saved_dp: int) -> None:
        """Convert `folder` to DeepSpeed's universal format (rank 0, into this run's folder: the source
        checkpoint may belong to another run and stays untouched), load it on every rank, remove it."""
        staging = Path(self.cfg.run.root) / self.cfg.run.name / f".ds_universal-{folder.parent.name}"
        if dist.get_rank() == 0:
            print(
                f"DeepSpeed checkpoint {folder} was written by {saved_dp} data-parallel rank(s), this run "
                f"has {self.dims.dp}: converting it to a universal checkpoint in {staging}",
                file=sys.stderr,
            )
        # Two DeepSpeed 0.19 ZeRO-3 universal-load bugs, undone after loading: every param group gets the
        # first group's hyperparameters (weight decay on norms and embeddings), and all sub-groups share
        # one `step` tensor, which torch's AdamW increments in place once per sub-group (wrong bias
        # correction from the second step on).
        groups = self.base_optimizer.param_groups
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        what = f"converting {folder} to a universal checkpoint"
        with staged_by_rank0(staging, lambda out: to_universal(folder / CKPT_TAG, out / CKPT_TAG), what):
            config = self.engine._config
            config.load_universal_checkpoint = True
            try:
                path, _ = self.engine.load_checkpoint(
                    str(staging), tag=CKPT_TAG, load_lr_scheduler_states=False
                )
            finally:
                config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"{staging}: the universal conversion of {folder} did not load")
        for group, values in zip(groups, hyper, strict=True):
            group.update(values)
        for state in self.base_optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    @torch.no_grad()
    def _load_native(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy native weights into the module, then into DeepSpeed's fp32 master copies."""
        params = dict(self.model.named_parameters())
        stage3 = self.ds_config["zero_optimization"]["stage"] == 3
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=stage3):
            for name, p in params.items():
                p.copy_(weights[name].to(p.dtype))
        if hasattr(self.optimizer, "refresh_fp32_params"):  # ZeRO 1-3 / bf16 keep separate fp32 masters
            self.optimizer.refresh_fp32_params()

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Whole fp32 weights under the native names (ZeRO-3 shards are gathered)."""
        params = list(self.model.parameters())
        enabled = self.ds_config["zero_optimization"]["stage"] == 3
        with deepspeed.zero.GatheredParameters(params, enabled=enabled):
            return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}
