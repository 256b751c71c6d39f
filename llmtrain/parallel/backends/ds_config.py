"""The DeepSpeed JSON, derived from our typed config (generated, never kept by hand).

A pure function of the config, the data-parallel degree and the accumulation steps, so it is unit-tested
without DeepSpeed installed and written to `<run_dir>/deepspeed_config.json` for the user to read.
What DeepSpeed must *not* own is left out on purpose: no "optimizer" (we pass a torch AdamW, which keeps
the update identical to the native engine and avoids building the fused CPU Adam, 7e-5 off torch's) and no
"scheduler" (our LR schedule sets the lr every step).
"""

from typing import Any

from llmtrain.config import Config
from llmtrain.config.errors import ConfigError

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
ENGINE_OPTIONS = {
    "offload_optimizer": "none|cpu|nvme: where ZeRO keeps optimizer state (default: cpu if cpu_offload)",
    "offload_param": "none|cpu|nvme: where ZeRO-3 keeps parameters (default: cpu if cpu_offload)",
    "offload_nvme_path": "folder on a local NVMe drive for nvme offload (needs DeepSpeed's async_io op)",
    "reduce_bucket_size": "elements per gradient reduction bucket (int)",
    "overlap_comm": "true|false: overlap gradient reduction with backward",
}


def _option(opts: dict[str, str], key: str, default: str, allowed: tuple[str, ...] | None = None) -> str:
    value = str(opts.get(key, default))
    if allowed is not None and value not in allowed:
        raise ConfigError(f"parallel.engine_options.{key}={value!r}: allowed values are {', '.join(allowed)}")
    return value


def _offload(device: str, nvme_path: str | None, key: str) -> dict[str, Any]:
    if device == "nvme" and not nvme_path:
        raise ConfigError(
            f"parallel.engine_options.{key}=nvme needs parallel.engine_options.offload_nvme_path"
        )
    out: dict[str, Any] = {"device": device, "pin_memory": False}
    if device == "nvme":
        out["nvme_path"] = nvme_path
    return out


DS_DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce/allgather bucket, in elements (2 GB of fp32)


def deepspeed_config(cfg: Config, dp: int, grad_accum: int, num_params: int | None = None) -> dict[str, Any]:
    """DeepSpeed config for `cfg` on `dp` data-parallel ranks with `grad_accum` micro-batches a step.

    With `num_params`, the ZeRO buckets are capped at the model size: DeepSpeed allocates a full
    bucket per backward whatever the model, and its 2 GB default cost 9 s of page faults per step on a
    0.1M-parameter model here."""
    p, t = cfg.parallel, cfg.trainer
    unknown = sorted(set(p.engine_options) - set(ENGINE_OPTIONS))
    if unknown:
        allowed = "; ".join(f"{k} ({v})" for k, v in ENGINE_OPTIONS.items())
        raise ConfigError(
            f"parallel.engine_options has unknown keys {unknown} for deepspeed; allowed: {allowed}"
        )
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: deepspeed supports 0, 1, 2, 3")
    if t.precision not in ("fp32", "bf16"):
        raise ConfigError(f"trainer.precision={t.precision}: the deepspeed engine supports fp32, bf16")
    opts = p.engine_options
    default = "cpu" if p.cpu_offload else "none"
    nvme = opts.get("offload_nvme_path")
    zero: dict[str, Any] = {"stage": p.zero_stage}
    off_opt = _option(opts, "offload_optimizer", default, OFFLOAD_DEVICES)
    off_param = _option(opts, "offload_param", default if p.zero_stage == 3 else "none", OFFLOAD_DEVICES)
    if off_opt != "none":
        if p.zero_stage == 0:
            raise ConfigError(
                "parallel.cpu_offload / engine_options.offload_optimizer need parallel.zero_stage >= 1"
            )
        zero["offload_optimizer"] = _offload(off_opt, nvme, "offload_optimizer")
    if off_param != "none":
        if p.zero_stage != 3:
            raise ConfigError("parallel.engine_options.offload_param needs parallel.zero_stage=3")
        zero["offload_param"] = _offload(off_param, nvme, "offload_param")
    if "reduce_bucket_size" in opts:
        zero["reduce_bucket_size"] = int(opts["reduce_bucket_size"])
    elif num_params is not None and p.zero_stage > 0:
        bucket = min(DS_DEFAULT_BUCKET, max(num_params, 1 << 20))
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = bucket
    if "overlap_comm" in opts:
        zero["overlap_comm"] = _option(opts, "overlap_comm", "false", ("true", "false")) == "true"
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": t.micro_batch_size * grad_accum * dp,
        # DeepSpeed's default is 1.0 whatever the user wanted: always state ours (0 disables).
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        # we pass a torch AdamW: allow it under ZeRO and under offload (no DeepSpeedCPUAdam build)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "seed": t.seed,
    }
