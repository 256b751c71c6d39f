"""Mixture-of-experts feed-forward: token-choice top-k router, dropless dispatch, grouped GEMMs.

One MoE layer replaces a block's SwiGLU (`llmtrain.models.llama.TransformerBlock` picks it from
`moe_every` / `moe_first_k_dense`). Design (docs/moe.md):

- Router: logits = x W_r^T (fp32), scores = softmax or sigmoid; the top-k experts are chosen on
  scores + `expert_bias` (aux-loss-free balancing, DeepSeek-V3) but weighted by the unbiased scores,
  optionally renormalised over the k chosen and scaled by `route_scale`.
- Dropless dispatch: the (token, choice) pairs are sorted by expert, every expert runs on all of its
  tokens (no capacity, no padding) as one grouped GEMM (`torch._grouped_mm` with int32 end offsets)
  or one matmul per expert, and the outputs are gathered back and summed with the routing weights.
- Auxiliary losses are computed *per sequence* (row) and enter the training loss weighted by that
  row's target tokens, the same weighting as the cross-entropy (`llmtrain.parallel.step`): the global
  objective is  sum_t ce_t / N + sum_rows n_row * (c_aux * lb_row + c_z * z_row) / N.  Every term
  depends only on its own row, so any split of the global batch into micro-batches and data-parallel
  ranks gives exactly the one-big-batch loss and gradient (tests/models/test_moe.py). lb_row is the
  Switch/DeepSeek-V3 sequence-wise balance loss E/(K*s) * sum_e count_e * mean_t p_te (1 when
  balanced), z_row the mean squared logsumexp of the router logits (ST-MoE).
- The selection bias moves outside the gradient after each optimizer step from the step's global
  expert loads (all-reduced over data parallelism so every replica keeps the same bias):
  b_e += rate * sign(mean load - load_e), centred to mean zero (torchtitan does the same).

The step drives two hooks, `collect_moe_losses` after each micro-batch's forward and `moe_step_end`
after the optimizer step; the trainer logs `moe_stats` every interval. Dense models pay nothing:
without MoE layers the hooks return at once.

Under pipeline parallelism no single place sees every layer's router terms: the schedule backs up
the loss of the last stage only. So each MoE layer adds its own weighted aux term to the backward
itself: the engine hands every layer the step's per-micro-batch row token counts and loss scale
(`set_moe_microbatches`), the stage marks which micro-batch it runs (`moe_microbatch`), and the
layer's forward attaches the aux term to its output with `_AttachAux`, an identity whose backward
also seeds the per-row terms' gradients scale * coefficient * n_row (as Megatron's
MoEAuxLossAutoScaler seeds its aux loss). The gradient then
reaches the router of whatever stage owns the layer, with the one-process weighting.
"""

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from llmtrain.distributed.collectives import all_reduce_, gather_objects


@dataclass(frozen=True, kw_only=True)
class MoEArgs:
    """Shape and routing of one MoE layer (the model.moe_* config keys)."""

    dim: int
    num_experts: int
    top_k: int
    expert_dim: int
    score: str = "softmax"
    norm_topk: bool = True
    route_scale: float = 1.0
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    gemm: str = "auto"


@functools.cache
def grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` (forward and backward) runs on this device type and dtype; probed
    once with a tiny problem (CUDA needs sm90+ and bf16, torch 2.13 also runs it on CPU)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(16, 16, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
        torch._grouped_mm(x, w, offs=offs).mul(
            torch.ones(16, 16, device=device_type, dtype=dtype)
        ).sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def expert_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Rows of x (T, a), sorted by expert with counts[e] rows for expert e, times w[e] (E, a, b)."""
    if grouped:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return torch._grouped_mm(x, w, offs=offs)
    parts = x.split(counts.tolist())
    return torch.cat([xe @ w[e] for e, xe in enumerate(parts)])


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as (E, in, out) tensors, so one grouped GEMM serves them all and the
    expert dimension is the one FSDP (and expert parallelism) shards."""

    def __init__(self, num_experts: int, dim: int, hidden: int, gemm: str = "auto") -> None:
        super().__init__()
        self.gemm = gemm
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (T, dim) sorted by expert, counts (E,) tokens per local expert -> (T, dim)."""
        # under expert parallelism the weights are DTensor shards: this rank's experts are its local part
        w1, w3, w2 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2))
        if torch.is_autocast_enabled(x.device.type):  # autocast has no rule for _grouped_mm
            dt = torch.get_autocast_dtype(x.device.type)
            x, w1, w3, w2 = x.to(dt), w1.to(dt), w3.to(dt), w2.to(dt)
        else:
            x = x.to(w1.dtype)
        grouped = self.gemm == "grouped" or (self.gemm == "auto" and grouped_mm_runs(x.device.type, x.dtype))
        h = F.silu(expert_matmul(x, w1, counts, grouped)) * expert_matmul(x, w3, counts, grouped)
        return expert_matmul(h, w2, counts, grouped)


class Router(nn.Module):
    """Token-choice top-k router with an optional selection bias (a buffer: saved, not trained)."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.dim))
        self.register_buffer("expert_bias", torch.zeros(args.num_experts), persistent=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, dim) -> routing weights (T, k), expert ids (T, k), scores (T, E), logits (T, E)."""
        logits = F.linear(x, self.weight).float()
        scores = logits.softmax(-1) if self.args.score == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if self.args.bias_update_rate > 0 else scores
        idx = choice.topk(self.args.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        if self.args.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return weights * self.args.route_scale, idx, scores, logits


class _AttachAux(torch.autograd.Function):
    """Identity on `out` whose backward also seeds the per-row router terms lb, z with the constant
    gradients g_lb, g_z (scale * coefficient * row tokens): the aux loss joins the backward of
    whatever `out` flows into (a pipeline stage's output). The constants live on ctx, not in saved
    tensors, so activation checkpointing's recomputation (which attaches nothing) saves the same
    tensors as the forward."""

    @staticmethod
    def forward(ctx, out, lb, z, g_lb, g_z):  # type: ignore[override]
        ctx.g_lb, ctx.g_z = g_lb, g_z
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, ctx.g_lb, ctx.g_z, None, None


@dataclass
class MicroBatches:
    """A pipelined step's router-loss weights: row target tokens per micro-batch and the loss scale
    (dp / global tokens), and the micro-batch the stage is running (None outside its forward)."""

    rows: list[torch.Tensor]
    scale: float
    current: int | None = None


class MoE(nn.Module):
    """Routed experts (+ optional shared experts, a plain SwiGLU the caller builds)."""

    def __init__(self, args: MoEArgs, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.args = args
        self.router = Router(args)
        self.experts = GroupedExperts(args.num_experts, args.dim, args.expert_dim, args.gemm)
        self.shared_experts = shared
        # set by llmtrain.parallel.expert_parallel: (rows sorted by expert, counts, experts) -> outputs
        self.token_dispatcher: Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor] | None = None
        self._pending: dict[str, torch.Tensor] | None = None
        self.microbatches: MicroBatches | None = None  # set under pipeline parallelism only
        self._step: torch.Tensor | None = None  # this step: [loads (E), lb sum, z sum, row tokens]
        # host bookkeeping, not a buffer: explicit cpu, since models are built under torch.device("meta")
        self._interval = torch.zeros(args.num_experts + 3, dtype=torch.float64, device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, dim = x.shape
        flat = x.reshape(-1, dim)
        weights, idx, scores, logits = self.router(flat)
        out = self.dispatch_combine(flat, weights, idx)
        if self.training and torch.is_grad_enabled():
            self._pending = self._router_terms(idx, scores, logits, bsz, seqlen)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        mb = self.microbatches
        if mb is not None and mb.current is not None and self._pending is not None:
            out = self._attach_losses(out, mb)  # pipelined: this stage backs up its own router terms
        return out.view(bsz, seqlen, dim)

    def _attach_losses(self, out: torch.Tensor, mb: MicroBatches) -> torch.Tensor:
        """Fold the forward's router terms into the step's totals and attach their weighted gradient
        (scale * n_row * coefficient per row, as `take_losses` + the step's backward would give)."""
        p, self._pending = self._pending, None
        assert p is not None and mb.current is not None
        w = self._fold(p, mb.rows[mb.current])
        a = self.args
        if a.aux_loss_coef == 0 and a.z_loss_coef == 0:
            return out
        g_lb, g_z = w * (mb.scale * a.aux_loss_coef), w * (mb.scale * a.z_loss_coef)
        return _AttachAux.apply(out, p["lb"], p["z"], g_lb.to(p["lb"].dtype), g_z.to(p["z"].dtype))

    def dispatch_combine(self, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sort the (token, choice) pairs by expert, run the experts, gather back, weight and sum."""
        num_tokens, k = idx.shape
        flat_idx = idx.flatten()
        order = flat_idx.argsort(stable=True)
        counts = torch.bincount(flat_idx, minlength=self.args.num_experts)
        rows = flat.index_select(0, order // k)
        if self.token_dispatcher is None:
            out = self.experts(rows, counts)
        else:  # expert parallelism: the rows go to the ranks that hold their experts and come back
            out = self.token_dispatcher(rows, counts, self.experts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        back = out.index_select(0, inverse).view(num_tokens, k, -1)
        return (back * weights.unsqueeze(-1).to(back.dtype)).sum(1).to(flat.dtype)

    def _router_terms(
        self, idx: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor, bsz: int, seqlen: int
    ) -> dict[str, torch.Tensor]:
        """Per-row balance loss and z-loss (differentiable) and the detached expert loads."""
        n_exp, k = self.args.num_experts, self.args.top_k
        ones = torch.ones(bsz, seqlen * k, device=idx.device, dtype=scores.dtype)
        row_counts = torch.zeros(bsz, n_exp, device=idx.device, dtype=scores.dtype)
        row_counts.scatter_add_(1, idx.view(bsz, seqlen * k), ones)
        probs = scores if self.args.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        mean_probs = probs.view(bsz, seqlen, n_exp).mean(1)
        lb = (row_counts * (n_exp / (k * seqlen)) * mean_probs).sum(-1)
        z = torch.logsumexp(logits, -1).square().view(bsz, seqlen).mean(1)
        return {"loads": row_counts.sum(0).detach(), "lb": lb, "z": z}

    def take_losses(self, row_tokens: torch.Tensor) -> torch.Tensor | None:
        """Fold the last forward's router terms into this step's totals and return its weighted
        auxiliary loss  sum_rows n_row * (c_aux * lb_row + c_z * z_row)  (None: no coefficient)."""
        p, self._pending = self._pending, None
        if p is None:
            return None
        w = self._fold(p, row_tokens)
        a = self.args
        if a.aux_loss_coef == 0 and a.z_loss_coef == 0:
            return None
        return a.aux_loss_coef * (w * p["lb"]).sum() + a.z_loss_coef * (w * p["z"]).sum()

    @torch.no_grad()
    def _fold(self, p: dict[str, torch.Tensor], row_tokens: torch.Tensor) -> torch.Tensor:
        """Add one micro-batch's [loads, weighted lb sum, weighted z sum, row tokens] to the step's
        totals (no graph: nothing for activation checkpointing to track); returns the row weights."""
        w = row_tokens.to(p["lb"].device, p["lb"].dtype)
        totals = torch.cat([p["loads"], torch.stack([(w * p["lb"]).sum(), (w * p["z"]).sum(), w.sum()])])
        self._step = totals.double() if self._step is None else self._step + totals.double()
        return w

    def step_totals(self) -> torch.Tensor:
        """This step's [loads, lb sum, z sum, row tokens] on the host (zeros before any forward)."""
        t = self._step
        self._step = None
        return torch.zeros_like(self._interval) if t is None else t.detach().cpu()

    @torch.no_grad()
    def finish_step(self, totals: torch.Tensor) -> None:
        """After the optimizer step, with the global totals: update the bias, add to the interval.
        A frozen router (LoRA: only adapters train) keeps its bias too: the base model's routing is
        part of what is frozen, and an adapters-only checkpoint would not keep a moved bias."""
        self._interval += totals
        loads = totals[: self.args.num_experts]
        rate = self.args.bias_update_rate
        if rate > 0 and loads.sum() > 0 and self.router.weight.requires_grad:
            delta = rate * torch.sign(loads.mean() - loads)
            bias = self.router.expert_bias
            bias += (delta - delta.mean()).to(bias.device, bias.dtype)

    def interval_loads(self) -> list[float]:
        """Global tokens per expert since the last `interval_stats` (the router's choices, summed)."""
        return self._interval[: self.args.num_experts].tolist()

    def interval_stats(self) -> dict[str, float]:
        """Load imbalance (max/mean tokens per expert), mean balance loss and z-loss since the last
        call, and the bias range; resets the interval."""
        t, n_exp = self._interval, self.args.num_experts
        self._interval = torch.zeros_like(t)
        loads, tokens = t[:n_exp], float(t[n_exp + 2])
        bias = self.router.expert_bias.detach().float().cpu()
        return {
            "imbalance": float(loads.max() / loads.mean()) if loads.sum() > 0 else 0.0,
            "lb_sum": float(t[n_exp]),
            "z_sum": float(t[n_exp + 1]),
            "tokens": tokens,
            "bias_min": float(bias.min()),
            "bias_max": float(bias.max()),
        }

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Zero the selection bias (after meta-device materialization it holds garbage)."""
        self.router.expert_bias.zero_()


def moe_layers(model: nn.Module | None) -> list[tuple[int, MoE]]:
    """(layer index, MoE) of every MoE layer of a (possibly wrapped) model, in layer order."""
    if model is None:
        return []
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            match = re.search(r"layers\.(\d+)\.", name + ".")
            found.append((int(match.group(1)) if match else len(found), module))
    return sorted(found, key=lambda item: item[0])


def collect_moe_losses(model: nn.Module, row_tokens: torch.Tensor) -> torch.Tensor | None:
    """After a micro-batch's forward: the summed weighted auxiliary losses of all MoE layers (None
    for a dense model or zero coefficients). `row_tokens` (b,): target tokens of each row, the
    weights that make the aux terms scale like the token-summed cross-entropy (module docstring)."""
    total = None
    for _, layer in moe_layers(model):
        term = layer.take_losses(row_tokens)
        if term is not None:
            total = term if total is None else total + term
    return total


def set_moe_microbatches(model: nn.Module, rows: list[torch.Tensor] | None, scale: float = 1.0) -> None:
    """Before a pipelined training pass: every MoE layer of this rank's stages gets the micro-batches'
    row target tokens (in schedule order) and the loss scale; None after the pass."""
    shared = None if rows is None else MicroBatches(rows=rows, scale=scale)
    for _, layer in moe_layers(model):
        layer.microbatches = shared


@contextmanager
def moe_microbatch(stage: nn.Module, index: int) -> Iterator[None]:
    """Around one micro-batch's forward on a pipeline stage: which rows its MoE layers see. Outside
    it (shape inference, activation recomputation in the backward) no aux term is attached."""
    layers = [layer for _, layer in moe_layers(stage) if layer.microbatches is not None]
    for layer in layers:
        layer.microbatches.current = index  # type: ignore[union-attr]
    try:
        yield
    finally:
        for layer in layers:
            layer.microbatches.current = None  # type: ignore[union-attr]


def moe_step_end(model: nn.Module, dp_group: torch.distributed.ProcessGroup | None) -> None:
    """After the optimizer step: sum the step's expert loads and router terms over the data-parallel
    ranks (one all-reduce), update the selection biases, accumulate the interval statistics."""
    layers = moe_layers(model)
    if not layers:
        return
    totals = torch.stack([layer.step_totals() for _, layer in layers])
    all_reduce_(totals, dp_group)
    for (_, layer), row in zip(layers, totals):
        layer.finish_step(row)


def moe_step_discard(model: nn.Module) -> None:
    """A skipped optimizer step (llmtrain.resilience): drop its router totals, so that neither the next
    bias update nor the interval statistics count it. Every rank skips together: no collective."""
    for _, layer in moe_layers(model):
        layer.step_totals()


def moe_stats(
    model: nn.Module | None, pp_group: torch.distributed.ProcessGroup | None = None
) -> dict[str, float]:
    """Router statistics since the last call, for the interval metrics (empty for a dense model); with
    `pp_group` the layers of every pipeline stage (each rank calls it, all get the same numbers):
    moe/imbalance/layer<i> (max/mean tokens per expert), moe/imbalance_max, moe/aux_loss and
    moe/z_loss (token-weighted means over rows and layers, without coefficients), and with bias
    balancing moe/bias_range/layer<i>, moe/bias_min, moe/bias_max."""
    local = [(i, layer.interval_stats(), layer.args.bias_update_rate > 0) for i, layer in moe_layers(model)]
    parts = [local] if pp_group is None else gather_objects(local, pp_group)
    stats = sorted((s for part in parts for s in part), key=lambda s: s[0])
    if not stats:
        return {}
    out = {f"moe/imbalance/layer{i}": s["imbalance"] for i, s, _ in stats}
    tokens = max(sum(s["tokens"] for _, s, _ in stats), 1.0)
    out["moe/imbalance_max"] = max(s["imbalance"] for _, s, _ in stats)
    out["moe/aux_loss"] = sum(s["lb_sum"] for _, s, _ in stats) / tokens
    out["moe/z_loss"] = sum(s["z_sum"] for _, s, _ in stats) / tokens
    biased = [(i, s) for i, s, on in stats if on]
    for i, s in biased:
        out[f"moe/bias_range/layer{i}"] = s["bias_max"] - s["bias_min"]
    if biased:
        out["moe/bias_min"] = min(s["bias_min"] for _, s in biased)
        out["moe/bias_max"] = max(s["bias_max"] for _, s in biased)
    return out
