"""Rules that tie config sections together and need nothing but the config (no world size, no torch).

Where each kind of rule lives (docs/architecture.md, "Rules"):
- here: cross-field rules knowable from the config alone (tp divides the heads, pipeline stage counts,
  schedule <-> virtual stages, objective/peft compatibility), run by `validate_config` at compose time;
- `llmtrain.parallel.layout.check_layout`: rules that need the world size (factors resolved from -1,
  batch geometry, derived pipeline micro-batches), run by every launcher before a rank starts;
- each engine: what that engine cannot do (e.g. DeepSpeed without ZeRO family switch).
Each rule is written once, in one of these places.
"""

from llmtrain.config.errors import ConfigError, check, check_choice
from llmtrain.config.fp8 import FP8_RECIPES
from llmtrain.config.objective import CHAT_TEMPLATES, OBJECTIVES, OVERLONG
from llmtrain.config.peft import LORA_TARGETS, PEFT_METHODS
from llmtrain.config.resilience import ACTIONS
from llmtrain.config.schema import Config


def check_parallel_factors(*, dp_replicate: int, dp_shard: int, tp: int, pp: int) -> None:
    """Each factor is >= 1, data-parallel ones may be -1 (fill the world), not both. Shared by the
    config check and `ParallelDims`, which is also built directly by tools and tests."""
    for key, value in (("tp", tp), ("pp", pp)):
        if value < 1:
            raise ConfigError(f"parallel.{key}={value} must be >= 1")
    for key, value in (("dp_replicate", dp_replicate), ("dp_shard", dp_shard)):
        if value == 0 or value < -1:
            raise ConfigError(f"parallel.{key}={value} must be >= 1 or -1 (fill the world)")
    if dp_replicate == -1 and dp_shard == -1:
        raise ConfigError("parallel.dp_replicate and parallel.dp_shard cannot both be -1 (auto)")


def stage_layer_counts(n_layers: int, num_stages: int, layers_per_stage: list[int] | None) -> list[int]:
    """Blocks per pipeline stage: the explicit list, or an even split (which must divide n_layers).
    Pure arithmetic, so validating a config never imports torch.distributed.pipelining."""
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != num_stages or sum(counts) != n_layers or min(counts) < 0:
            raise ConfigError(
                f"parallel.pp_layers_per_stage={counts} must list {num_stages} non-negative counts "
                f"(parallel.pp x parallel.pp_virtual_stages) summing to model.n_layers={n_layers}"
            )
        return counts
    if n_layers % num_stages:
        raise ConfigError(
            f"model.n_layers={n_layers} is not divisible by {num_stages} pipeline stages "
            "(parallel.pp x parallel.pp_virtual_stages); set parallel.pp_layers_per_stage to split unevenly"
        )
    return [n_layers // num_stages] * num_stages


def check_parallel_config(cfg: Config) -> None:
    """World-size-independent layout rules; every message names the config keys involved."""
    p, m = cfg.parallel, cfg.model
    check_parallel_factors(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, pp=p.pp)
    check(p.pp_virtual_stages >= 1, "parallel.pp_virtual_stages", f"{p.pp_virtual_stages} must be >= 1")
    _check_tp_divides(cfg)
    if m.tie_embeddings and (p.tp > 1 or p.pp > 1):
        raise ConfigError(
            "model.tie_embeddings=true is not supported with parallel.tp > 1 or parallel.pp > 1"
        )
    _check_pipeline(cfg)
    if m.qk_norm and (p.tp > 1 or p.backend == "megatron"):
        raise ConfigError(
            f"model.qk_norm=true needs parallel.tp=1 and parallel.backend native or deepspeed, got "
            f"tp={p.tp}, backend={p.backend}: the per-head norm weight has no tensor-parallel plan and is "
            "not translated into megatron-core's attention"
        )
    check_moe_parallel(cfg)
    check_expert_parallel(cfg)
    check_context_parallel(cfg)
    if p.dp_shard != -1:  # -1 resolves with the world size: parallel.layout applies the same rule then
        check_zero_shards(p.zero_stage, p.dp_shard)
    if p.backend == "native" and p.zero_stage == 0 and p.param_dtype != "fp32":
        raise ConfigError(
            f"parallel.param_dtype={p.param_dtype} is applied by ZeRO/FSDP2 only; with "
            "parallel.zero_stage=0 use trainer.precision=bf16 (autocast) instead"
        )


MOE_PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def check_moe_parallel(cfg: Config) -> None:
    """What an MoE model (model.moe_num_experts > 0) runs on today, with the reason for each refusal."""
    p, m = cfg.parallel, cfg.model
    if m.moe_num_experts == 0:
        return
    if p.backend != "native":
        raise ConfigError(
            f"model.moe_num_experts={m.moe_num_experts} runs on parallel.backend=native only, got "
            f"{p.backend}: our experts (GroupedExperts, token-choice router, per-row aux losses) are not "
            "translated into DeepSpeed's or megatron-core's MoE layers"
        )
    if p.pp > 1 and p.pp_schedule not in MOE_PP_SCHEDULES:
        raise ConfigError(
            f"model.moe_num_experts={m.moe_num_experts} with parallel.pp_schedule={p.pp_schedule} is not "
            f"supported (the zero-bubble schedules split the backward, and the router losses each stage "
            f"attaches are untested there); allowed: {', '.join(MOE_PP_SCHEDULES)}"
        )


def check_expert_parallel(cfg: Config) -> None:
    """parallel.ep > 1 needs routed experts it can split evenly (the world-size rule, ep divides the
    data-parallel degree, is in llmtrain.parallel.layout)."""
    p, m = cfg.parallel, cfg.model
    check(p.ep >= 1, "parallel.ep", f"{p.ep} must be >= 1")
    if p.ep == 1:
        return
    if m.moe_num_experts == 0:
        raise ConfigError(
            f"parallel.ep={p.ep} shards routed experts, but model.moe_num_experts=0 (a dense model): "
            "use parallel.ep=1 or an MoE model (e.g. model=moe_tiny)"
        )
    if m.moe_num_experts % p.ep:
        raise ConfigError(
            f"parallel.ep={p.ep} must divide model.moe_num_experts={m.moe_num_experts} (each expert-parallel "
            "rank holds moe_num_experts / ep experts)"
        )


def check_context_parallel(cfg: Config) -> None:
    """What parallel.cp > 1 runs with today (llmtrain.parallel.context_parallel), each refusal with why."""
    p, cp, seq = cfg.parallel, cfg.parallel.cp, cfg.data.seq_len
    check(cp >= 1, "parallel.cp", f"{cp} must be >= 1")
    if cp == 1:
        return
    if seq % (2 * cp):
        raise ConfigError(
            f"data.seq_len={seq} must be divisible by 2 x parallel.cp = {2 * cp}: each sequence is cut "
            f"into {2 * cp} equal chunks, rank i holding chunks i and {2 * cp - 1}-i"
        )
    if p.tp > 1 and p.sequence_parallel and (seq // cp) % p.tp:
        raise ConfigError(
            f"data.seq_len / parallel.cp = {seq // cp} tokens per cp rank must be divisible by "
            f"parallel.tp={p.tp} with parallel.sequence_parallel=true"
        )
    why = {
        "parallel.backend": (p.backend != "native", p.backend, _CP_ENGINE_WHY),
        "parallel.zero_stage": (
            p.zero_stage > 0 and p.dp_replicate != 1,
            p.zero_stage,
            "HSDP (dp_replicate != 1, -1 included) with cp needs a 2-D (dp_replicate, dp_shard x cp) mesh, not built "
            "yet; use dp_replicate=1 (ZeRO shards over dp_shard x cp) or zero_stage=0",
        ),
        "model.moe_num_experts": (cfg.model.moe_num_experts > 0, cfg.model.moe_num_experts, "untested"),
        "objective.name": (
            cfg.objective.name != "causal_lm",
            cfg.objective.name,
            "only the causal LM batches are split into cp chunks",
        ),
    }
    for key, (bad, value, reason) in why.items():
        if bad:
            raise ConfigError(f"parallel.cp={cp} with {key}={value} is not supported: {reason}")


_CP_ENGINE_WHY = (
    "the native engine implements it; DeepSpeed's sequence parallelism (Ulysses) is another scheme "
    "(an all-to-all over heads inside its DistributedAttention wrapper, not wired to our model), and "
    "megatron-core 0.16.1's own DotProductAttention asserts context_parallel_size == 1 ('Context "
    "parallelism is only supported by TEDotProductAttention!'): it needs Transformer Engine (CUDA), "
    "which is not installed here"
)


def check_zero_shards(zero_stage: int, dp_shard: int, world_size: int | None = None) -> None:
    """dp_shard > 1 shards parameters/optimizer state, which only ZeRO stages 1-3 do. `world_size`:
    dp_shard was -1 and resolved on that many ranks."""
    if zero_stage == 0 and dp_shard > 1:
        what = (
            f"parallel.dp_shard resolves to {dp_shard} on {world_size} ranks"
            if world_size is not None
            else f"parallel.dp_shard={dp_shard} shards parameters/optimizer state"
        )
        raise ConfigError(
            f"{what}, which needs parallel.zero_stage 1, 2 or 3 (zero_stage=0 is DDP over "
            "parallel.dp_replicate): set parallel.zero_stage to 1, 2 or 3, or parallel.dp_shard=1"
        )


def _check_tp_divides(cfg: Config) -> None:
    p, m = cfg.parallel, cfg.model
    tp_divides = {
        "model.n_heads": m.n_heads,
        "model.n_kv_heads": m.kv_heads,
        "model.ffn_dim": m.hidden_dim,
        "model.vocab_size": m.vocab_size,
    }
    for key, value in tp_divides.items():
        if value % p.tp:
            hint = (
                " (KV-head replication across tp ranks is not implemented)"
                if key.endswith("kv_heads")
                else ""
            )
            raise ConfigError(f"{key}={value} must be divisible by parallel.tp={p.tp}{hint}")
    if p.tp > 1 and p.sequence_parallel and cfg.data.seq_len % p.tp:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must be divisible by parallel.tp={p.tp} with "
            "parallel.sequence_parallel=true"
        )


# schedules that run several stages per rank: looped (>= 2 chunks) or V-placed (exactly 2)
LOOPED_MULTI_STAGE = ("interleaved_1f1b", "interleaved_zb")
V_SHAPED = ("zbv", "dualpipev")
ZERO_BUBBLE = ("interleaved_zb", *V_SHAPED)  # backward split into input and weight passes


def min_pipeline_microbatches(schedule: str, pp: int) -> tuple[int, str]:
    """Fewest micro-batches `schedule` accepts on `pp` ranks, and why. DualPipeV refuses fewer than
    its 2*pp stages; ZBV's schedule table assumes 2*pp - 1 (it would index micro-batches that do
    not exist below that); the others leave stages idle (1F1B refuses) below pp."""
    if schedule == "dualpipev":
        return 2 * pp, "DualPipeV needs at least as many micro-batches as its 2 x parallel.pp stages"
    if schedule == "zbv":
        return 2 * pp - 1, "ZBV's schedule fills 2 x parallel.pp - 1 micro-batches before the steady state"
    return pp, "fewer micro-batches than stages leaves stages idle; 1F1B rejects it"


def _check_virtual_stages(schedule: str, virtual: int) -> None:
    """Stages per rank the schedule runs: >= 2 looped, exactly 2 in a V, else 1."""
    key = f"parallel.pp_schedule={schedule}"
    if schedule in LOOPED_MULTI_STAGE and virtual < 2:
        raise ConfigError(f"{key} needs parallel.pp_virtual_stages >= 2")
    if schedule in V_SHAPED and virtual != 2:
        raise ConfigError(
            f"{key} places exactly two stages per rank in a V (stages r and 2 x pp - 1 - r): "
            f"set parallel.pp_virtual_stages=2 (got {virtual})"
        )
    if schedule not in LOOPED_MULTI_STAGE + V_SHAPED and virtual != 1:
        raise ConfigError(
            f"{key} runs one stage per rank: set parallel.pp_virtual_stages=1 (or pp_schedule="
            f"{', '.join(LOOPED_MULTI_STAGE + V_SHAPED)})"
        )


def _check_pipeline(cfg: Config) -> None:
    """Schedule <-> virtual stages, stage split, explicit micro-batch count (the derived one needs the
    world size: parallel.layout)."""
    p = cfg.parallel
    if p.pp == 1:
        return
    _check_virtual_stages(p.pp_schedule, p.pp_virtual_stages)
    if p.compile and p.pp_schedule in ZERO_BUBBLE:
        # torch checks for OptimizedModule wrappers only; our in-place Module.compile slips past it
        raise ConfigError(
            f"parallel.compile=true with parallel.pp_schedule={p.pp_schedule}: torch's zero-bubble "
            "schedules do not support the input/weight backward split under torch.compile"
        )
    stage_layer_counts(cfg.model.n_layers, p.pp * p.pp_virtual_stages, p.pp_layers_per_stage)
    least, why = min_pipeline_microbatches(p.pp_schedule, p.pp)
    if p.pp_microbatches is not None and p.pp_microbatches < least:
        raise ConfigError(
            f"parallel.pp_microbatches={p.pp_microbatches} must be >= {least} with parallel.pp={p.pp} "
            f"and parallel.pp_schedule={p.pp_schedule} ({why})"
        )


def validate_objective(cfg: Config) -> None:
    """Choices, ranges and required fields of the objective group, naming the key."""
    o = cfg.objective
    check_choice("objective.name", o.name, OBJECTIVES)
    m = o.masked_lm
    check(
        0.0 < m.mask_prob <= 1.0, "objective.masked_lm.mask_prob", f"must be within (0, 1], got {m.mask_prob}"
    )
    check(
        m.mask_token_prob >= 0
        and m.random_token_prob >= 0
        and m.mask_token_prob + m.random_token_prob <= 1.0,
        "objective.masked_lm.mask_token_prob",
        f"mask_token_prob={m.mask_token_prob} and random_token_prob={m.random_token_prob} must be >= 0 "
        "and sum to at most 1",
    )
    if m.mask_token_id is not None:
        check(
            0 <= m.mask_token_id < cfg.model.vocab_size,
            "objective.masked_lm.mask_token_id",
            f"{m.mask_token_id} must be within [0, model.vocab_size={cfg.model.vocab_size})",
        )
    s = o.sft
    check_choice("objective.sft.chat_template", s.chat_template, CHAT_TEMPLATES)
    check_choice("objective.sft.overlong", s.overlong, OVERLONG)
    if o.name == "sft":
        check(
            bool(s.train_path),
            "objective.sft.train_path",
            "a jsonl file of examples is required for objective=sft",
        )
    d = o.distill
    check(d.temperature > 0, "objective.distill.temperature", f"must be > 0, got {d.temperature}")
    check(0.0 <= d.alpha <= 1.0, "objective.distill.alpha", f"must be within [0, 1], got {d.alpha}")
    if o.name == "distill":
        check(
            bool(d.teacher),
            "objective.distill.teacher",
            "a teacher checkpoint path is required for objective=distill",
        )
    if o.name == "causal_lm":
        return
    p = cfg.parallel
    check(
        p.pp == 1,
        "objective.name",
        f"{o.name} is not supported with pipeline parallelism (parallel.pp={p.pp})",
    )
    # deepspeed passes positions and masks but not the causal flag or a loss hook; megatron neither
    engines = ("native", "deepspeed") if o.name == "sft" else ("native",)
    check(
        p.backend in engines,
        "objective.name",
        f"{o.name} runs on parallel.backend={' or '.join(engines)}, got {p.backend}",
    )
    if o.name == "distill":
        check(
            p.tp == 1,
            "objective.name",
            f"distill needs whole-vocabulary logits; parallel.tp={p.tp} is not supported",
        )


def validate_peft(cfg: Config) -> None:
    """Choices and ranges of the peft group, naming the key."""
    p = cfg.peft
    check_choice("peft.method", p.method, PEFT_METHODS)
    if p.method == "none":
        return
    check(p.rank > 0, "peft.rank", f"must be positive, got {p.rank}")
    check(p.alpha > 0, "peft.alpha", f"must be positive, got {p.alpha}")
    check(0.0 <= p.dropout < 1.0, "peft.dropout", f"must be within [0, 1), got {p.dropout}")
    check(
        len(p.target_modules) > 0, "peft.target_modules", f"choose at least one of: {', '.join(LORA_TARGETS)}"
    )
    for name in p.target_modules:
        check(
            name in LORA_TARGETS,
            "peft.target_modules",
            f"{name!r} is not allowed; choose from {', '.join(LORA_TARGETS)}",
        )
    check(
        cfg.parallel.tp == 1 and cfg.parallel.pp == 1,
        "peft.method",
        f"lora supports data parallelism (DDP, ZeRO/FSDP2) only; got parallel.tp={cfg.parallel.tp}, "
        f"parallel.pp={cfg.parallel.pp}",
    )
    check(
        cfg.parallel.backend == "native",
        "peft.method",
        f"lora runs on parallel.backend=native only, got {cfg.parallel.backend}",
    )
    check(
        not cfg.checkpoint.init_load_optimizer,
        "checkpoint.init_load_optimizer",
        "must be false with peft.method=lora (the base run's optimizer state is for other parameters)",
    )
    if p.adapters_only_checkpoint:
        check(
            bool(cfg.checkpoint.init_from),
            "checkpoint.init_from",
            "peft.method=lora with peft.adapters_only_checkpoint=true needs the base checkpoint to fine-tune "
            "(or set peft.adapters_only_checkpoint=false)",
        )


def validate_fp8(cfg: Config) -> None:
    """parallel.fp8: the recipe, and the engines/devices/features it is refused with (docs/fp8.md)."""
    f, p = cfg.parallel.fp8, cfg.parallel
    check_choice("parallel.fp8.recipe", f.recipe, FP8_RECIPES)
    if f.recipe == "none":
        return
    key = f"parallel.fp8.recipe={f.recipe}"
    check(
        p.backend == "native",
        "parallel.fp8.recipe",
        f"FP8 runs on parallel.backend=native only (torchao converts the native model's nn.Linear "
        f"layers; {p.backend} builds its own), got parallel.backend={p.backend}",
    )
    check(
        not (f.recipe == "mxfp8" and cfg.trainer.device == "cpu"),
        "parallel.fp8.recipe",
        "mxfp8 needs a Blackwell GPU (CUDA capability >= 10.0, e.g. B200); use tensorwise or rowwise "
        "with parallel.fp8.emulate=true on CPU",
    )
    check(
        f.emulate or cfg.trainer.device != "cpu",
        "parallel.fp8.emulate",
        f"{key} with trainer.device=cpu needs parallel.fp8.emulate=true (CPUs have no FP8 matmul; "
        "emulation casts to FP8 and multiplies in high precision)",
    )
    check(
        cfg.peft.method == "none",
        "parallel.fp8.recipe",
        f"FP8 is not supported with peft.method={cfg.peft.method} (LoRA wraps the linear layers FP8 converts)",
    )


FAULTS = ("none", "sigstop", "sigkill", "exit")
"""resilience.inject_fault choices (test hook)."""


def validate_hang(cfg: Config) -> None:
    """Process-group timeout, hang-watchdog deadlines, restart budget (docs/resilience.md "Hangs")."""
    r = cfg.resilience
    check(r.pg_timeout_s > 0, "resilience.pg_timeout_s", f"must be > 0, got {r.pg_timeout_s}")
    check(r.hang_factor > 0, "resilience.hang_factor", f"must be > 0, got {r.hang_factor}")
    check(
        0 < r.hang_min_s <= r.hang_max_s,
        "resilience.hang_min_s",
        f"must be > 0 and <= resilience.hang_max_s ({r.hang_max_s}), got {r.hang_min_s}",
    )
    check(r.hang_startup_s > 0, "resilience.hang_startup_s", f"must be > 0, got {r.hang_startup_s}")
    check(r.heartbeat_s > 0, "resilience.heartbeat_s", f"must be > 0, got {r.heartbeat_s}")
    check(
        not r.hang_watchdog or r.hang_max_s < r.pg_timeout_s,
        "resilience.hang_max_s",
        f"must be below resilience.pg_timeout_s ({r.pg_timeout_s}) so the watchdog fires before a "
        f"collective times out, got {r.hang_max_s}",
    )
    check(
        r.hang_warmup_steps >= 0, "resilience.hang_warmup_steps", f"must be >= 0, got {r.hang_warmup_steps}"
    )
    check(r.max_restarts >= 0, "resilience.max_restarts", f"must be >= 0, got {r.max_restarts}")
    check(r.crash_loop_after >= 1, "resilience.crash_loop_after", f"must be >= 1, got {r.crash_loop_after}")
    for fault in r.inject_fault:
        check_choice("resilience.inject_fault", fault, FAULTS)


def validate_resilience(cfg: Config) -> None:
    """Choices of the resilience actions, detector ranges, and the checkpoint a rollback reloads."""
    r = cfg.resilience
    check_choice("resilience.nonfinite", r.nonfinite, ACTIONS)
    check_choice("resilience.spike", r.spike, ACTIONS)
    check(r.rollback_after >= 1, "resilience.rollback_after", f"must be >= 1, got {r.rollback_after}")
    check(r.spike_window >= 3, "resilience.spike_window", f"must be >= 3, got {r.spike_window}")
    check(r.spike_threshold > 0, "resilience.spike_threshold", f"must be > 0, got {r.spike_threshold}")
    check(r.spike_warmup >= 0, "resilience.spike_warmup", f"must be >= 0, got {r.spike_warmup}")
    for key in ("nonfinite", "spike"):
        check(
            getattr(r, key) != "rollback" or cfg.checkpoint.enabled,
            f"resilience.{key}",
            "rollback reloads the last checkpoint: it needs checkpoint.enabled=true",
        )


def validate_stragglers(cfg: Config) -> None:
    """Straggler probe cadence and threshold (docs/resilience.md, Stragglers)."""
    r = cfg.resilience
    check(
        r.straggler_every >= 0,
        "resilience.straggler_every",
        f"must be >= 0 (0: off), got {r.straggler_every}",
    )
    check(
        r.straggler_threshold > 0,
        "resilience.straggler_threshold",
        f"must be > 0 (a fraction above the median), got {r.straggler_threshold}",
    )
    check(r.inject_slow_s >= 0, "resilience.inject_slow_s", f"must be >= 0, got {r.inject_slow_s}")
