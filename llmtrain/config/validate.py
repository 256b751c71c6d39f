"""Cross-field and choice validation with messages that name the key and the allowed values.

Hydra's structured configs already reject unknown keys and wrong types; this module adds what a type
cannot express (choices, ranges, divisibility) and a pre-check of command-line overrides that lists
the valid keys, so that mistakes are reported before any rank is spawned.
"""

import dataclasses
import difflib
import typing
from collections.abc import Iterable
from typing import Any

from llmtrain.config.checkpoint import resume_mode
from llmtrain.config.errors import ConfigError, check, check_choice
from llmtrain.config.launcher import LAUNCHERS
from llmtrain.config.model import check_moe_fields
from llmtrain.config.optim import SCHEDULES
from llmtrain.config.parallel import AC_MODES, BACKENDS, DTYPES, PP_SCHEDULES
from llmtrain.config.rules import (
    check_parallel_config,
    validate_fp8,
    validate_hang,
    validate_objective,
    validate_peft,
    validate_resilience,
    validate_stragglers,
)
from llmtrain.config.schema import Config
from llmtrain.config.storage import validate_storage
from llmtrain.config.tracking import TRACKING_BACKENDS
from llmtrain.config.trainer import DEVICES, PRECISIONS


def validate_config(cfg: Config) -> Config:
    """Validate choices and cross-field rules that do not depend on the world size."""
    m, t, o, p, d = cfg.model, cfg.trainer, cfg.optim, cfg.parallel, cfg.data
    check_choice("parallel.backend", p.backend, BACKENDS)
    check_choice("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    check_choice("parallel.activation_checkpoint", p.activation_checkpoint, AC_MODES)
    check_choice("parallel.param_dtype", p.param_dtype, DTYPES)
    check_choice("parallel.reduce_dtype", p.reduce_dtype, DTYPES)
    check_choice("parallel.zero_stage", p.zero_stage, (0, 1, 2, 3))
    check_choice("optim.schedule", o.schedule, SCHEDULES)
    check_choice("optim.name", o.name, ("adamw",))
    check_choice("trainer.device", t.device, DEVICES)
    check_choice("trainer.precision", t.precision, PRECISIONS)
    check_choice("tracking.backend", cfg.tracking.backend, TRACKING_BACKENDS)
    for key in ("flush_every_s", "system_metrics_every_s", "max_buffer", "request_timeout_s"):
        check(
            getattr(cfg.tracking, key) > 0,
            f"tracking.{key}",
            f"must be positive, got {getattr(cfg.tracking, key)}",
        )
    check_choice("launcher.name", cfg.launcher.name, LAUNCHERS)
    for key in ("dim", "n_layers", "n_heads", "vocab_size"):
        check(getattr(m, key) > 0, f"model.{key}", "must be positive")
    check(
        m.attn_head_dim is not None or m.dim % m.n_heads == 0,
        "model.dim",
        f"{m.dim} must be divisible by model.n_heads={m.n_heads} (or set model.attn_head_dim)",
    )
    kv = m.n_kv_heads or m.n_heads
    check(m.n_heads % kv == 0, "model.n_kv_heads", f"{kv} must divide model.n_heads={m.n_heads}")
    check_parallel_config(cfg)
    check(m.head_dim % 2 == 0, "model.dim", f"head dim {m.head_dim} must be even for RoPE")
    check_moe_fields(m)
    check(
        d.seq_len <= m.max_seq_len, "data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}"
    )
    check(len(d.sources) > 0, "data.sources", "at least one dataset is required")
    check_choice("data.packing", d.packing, ("concat", "whole_documents"))
    for i, s in enumerate(d.sources):
        check(s.weight > 0, f"data.sources[{i}].weight", f"must be > 0, got {s.weight}")
    check(t.max_steps > 0, "trainer.max_steps", "must be positive")
    check(t.micro_batch_size > 0, "trainer.micro_batch_size", "must be positive")
    check(t.global_batch_size > 0, "trainer.global_batch_size", "must be positive")
    check(t.log_every > 0, "trainer.log_every", "must be positive")
    check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be within [0, 1]")
    check(0.0 < o.decay_fraction <= 1.0, "optim.decay_fraction", "must be within (0, 1]")
    check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    ck = cfg.checkpoint
    check(ck.keep_last >= 1, "checkpoint.keep_last", "must be >= 1 (the newest checkpoint is always kept)")
    check(ck.every_steps >= 0 and ck.every_minutes >= 0, "checkpoint.every_steps", "must be >= 0")
    check(ck.keep_every >= 0, "checkpoint.keep_every", "must be >= 0 (0 keeps no permanent checkpoints)")
    check(
        str(ck.resume).strip() != "", "checkpoint.resume", "allowed: auto, none (false) or a checkpoint path"
    )
    ck.resume = resume_mode(ck.resume)
    check(cfg.launcher.nproc >= 1, "launcher.nproc", "must be >= 1")
    check(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", "must be a non-empty folder name")
    validate_objective(cfg)
    validate_peft(cfg)
    validate_fp8(cfg)
    validate_resilience(cfg)
    validate_storage(cfg.storage, cfg.checkpoint.mirror)
    validate_hang(cfg)
    validate_stragglers(cfg)
    return cfg


def batch_geometry(cfg: Config, dp: int) -> int:
    """Return gradient-accumulation steps for a data-parallel degree, or raise naming the keys."""
    t = cfg.trainer
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} must be divisible by "
            f"trainer.micro_batch_size={t.micro_batch_size} x data-parallel size {dp} = {per_step}"
        )
    return t.global_batch_size // per_step


def _fields(tp: Any) -> dict[str, Any] | None:
    """Dataclass fields of a (possibly Optional) type, or None for leaves."""
    if dataclasses.is_dataclass(tp):
        return {f.name: f.type for f in dataclasses.fields(tp)}
    return None


def check_override_keys(overrides: list[str], groups: Iterable[str]) -> None:
    """Reject `a.b=v` overrides whose key is not in the schema, listing the valid keys.

    Runs before Hydra composes, so a typo like `optim.lrr=1` is answered with the allowed keys and a
    suggestion instead of a bare "not in struct". Group choices (`model=1b`), appends (`+x=`),
    deletions (`~x`) and hydra.* keys are left to Hydra.
    """
    groups = set(groups)
    for ov in overrides:
        if "=" not in ov or ov[0] in "+~" or ov.startswith("hydra."):
            continue
        key = ov.split("=", 1)[0]
        if key in groups or key.startswith(("hydra", "experiment")):
            continue
        node: Any = Config
        path: list[str] = []
        for part in key.split("."):
            name = part.split("[", 1)[0]
            fields = _fields(node)
            if fields is None:
                break
            if name not in fields:
                where = ".".join(path) or "<root>"
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f" Did you mean '{'.'.join([*path, close[0]])}'?" if close else ""
                raise ConfigError(
                    f"unknown config key '{key}': '{name}' is not a field of {where}. "
                    f"Allowed keys there: {', '.join(sorted(fields))}.{hint}"
                )
            path.append(name)
            node = _strip_optional(fields[name])


def _strip_optional(tp: Any) -> Any:
    """Unwrap `X | None` to X so nested dataclasses behind Optional are still walked."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return args[0]
    return tp
