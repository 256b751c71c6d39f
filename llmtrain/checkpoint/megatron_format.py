"""Weight conversion between our native Transformer and megatron-core's GPTModel (local layer spec).

Pure tensor code (no megatron import), so a user can switch engines mid-project:
`to_megatron` cuts one rank's shard of a full native state dict, `from_megatron` rebuilds native tensors
from the full (TP-gathered) megatron tensors. Differences handled here:
- names: `layers.{L}.attention.wq` ... -> `decoder.layers.{l}.self_attention.linear_qkv` (l = the layer's
  index inside its pipeline chunk), `tok_embeddings` -> `embedding.word_embeddings`, ...;
- fused QKV: megatron stores [q heads of group g, k_g, v_g] for each KV group g (GQA), so a TP shard is a
  contiguous block of whole groups;
- RoPE convention: we rotate interleaved pairs (x[2i], x[2i+1]); megatron (non-fused, non-interleaved)
  rotates halves (x[i], x[i + d/2]). Permuting the rows of wq and wk per head makes both compute the same
  attention scores (q.k is invariant under the same permutation of q and k);
- fused gate/up: `linear_fc1` = [w1; w3] *per TP shard* (megatron's SwiGLU chunks the local output in two).
"""

import torch

from llmtrain.models.llama import TransformerArgs


def _rope_perm(head_dim: int) -> torch.Tensor:
    """Row order that turns interleaved RoPE pairs into megatron's half-split layout."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split over tp={size}")
    return t.chunk(size, dim)[rank].clone()


def fuse_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, args: TransformerArgs) -> torch.Tensor:
    """Native wq/wk/wv -> megatron's group-interleaved linear_qkv weight (full, unsharded)."""
    hd, nq, nkv = args.head_dim, args.n_heads, args.kv_heads
    perm = _rope_perm(hd)
    q = wq.view(nq, hd, -1)[:, perm].reshape(nkv, nq // nkv, hd, -1)
    k = wk.view(nkv, hd, -1)[:, perm].unsqueeze(1)
    v = wv.view(nkv, hd, -1).unsqueeze(1)
    return torch.cat([q, k, v], dim=1).reshape(-1, wq.shape[1])


def split_qkv(w: torch.Tensor, args: TransformerArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    hd, nq, nkv = args.head_dim, args.n_heads, args.kv_heads
    inv = torch.argsort(_rope_perm(hd))
    g = w.view(nkv, nq // nkv + 2, hd, -1)
    q = g[:, : nq // nkv].reshape(nq, hd, -1)[:, inv].reshape(nq * hd, -1)
    k = g[:, -2][:, inv].reshape(nkv * hd, -1)
    v = g[:, -1].reshape(nkv * hd, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def to_megatron(
    native: dict[str, torch.Tensor],
    args: TransformerArgs,
    layers: list[int],
    *,
    pre_process: bool,
    post_process: bool,
    tp_rank: int = 0,
    tp: int = 1,
) -> dict[str, torch.Tensor]:
    """State dict of one GPTModel chunk holding the global `layers` on TP rank `tp_rank` of `tp`."""
    out: dict[str, torch.Tensor] = {}
    col = lambda t: _shard(t, 0, tp_rank, tp)  # ColumnParallelLinear / VocabParallelEmbedding
    row = lambda t: _shard(t, 1, tp_rank, tp)  # RowParallelLinear
    if args.kv_heads % tp:
        raise ValueError(f"model.n_kv_heads={args.kv_heads} must be divisible by parallel.tp={tp}")
    if pre_process:
        out["embedding.word_embeddings.weight"] = col(native["tok_embeddings.weight"])
    for local, layer in enumerate(layers):
        n, m = f"layers.{layer}.", f"decoder.layers.{local}."
        a = n + "attention."
        qkv = fuse_qkv(native[a + "wq.weight"], native[a + "wk.weight"], native[a + "wv.weight"], args)
        out[m + "input_layernorm.weight"] = native[n + "attention_norm.weight"].clone()
        out[m + "self_attention.linear_qkv.weight"] = col(qkv)
        out[m + "self_attention.linear_proj.weight"] = row(native[a + "wo.weight"])
        out[m + "pre_mlp_layernorm.weight"] = native[n + "ffn_norm.weight"].clone()
        f = n + "feed_forward."
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [col(native[f + "w1.weight"]), col(native[f + "w3.weight"])]
        )
        out[m + "mlp.linear_fc2.weight"] = row(native[f + "w2.weight"])
    if post_process:
        out["decoder.final_layernorm.weight"] = native["norm.weight"].clone()
        key = "tok_embeddings.weight" if args.tie_embeddings else "output.weight"
        out["output_layer.weight"] = col(native[key])
    return out


def from_megatron(
    full: dict[str, torch.Tensor], args: TransformerArgs, layers: list[int], *, tp: int = 1
) -> dict[str, torch.Tensor]:
    """Native tensors of one chunk from its TP-gathered megatron tensors: `full[name]` is the concatenation
    of the TP shards along the sharded dim (so fc1 is [w1_0; w3_0; w1_1; w3_1; ...])."""
    out: dict[str, torch.Tensor] = {}
    if "embedding.word_embeddings.weight" in full:
        out["tok_embeddings.weight"] = full["embedding.word_embeddings.weight"]
    for local, layer in enumerate(layers):
        n, m = f"layers.{layer}.", f"decoder.layers.{local}."
        q, k, v = split_qkv(full[m + "self_attention.linear_qkv.weight"], args)
        out.update({n + "attention.wq.weight": q, n + "attention.wk.weight": k, n + "attention.wv.weight": v})
        out[n + "attention.wo.weight"] = full[m + "self_attention.linear_proj.weight"]
        out[n + "attention_norm.weight"] = full[m + "input_layernorm.weight"]
        out[n + "ffn_norm.weight"] = full[m + "pre_mlp_layernorm.weight"]
        shards = full[m + "mlp.linear_fc1.weight"].chunk(tp, 0)  # each shard is [w1_r; w3_r]
        out[n + "feed_forward.w1.weight"] = torch.cat([s.chunk(2, 0)[0] for s in shards])
        out[n + "feed_forward.w3.weight"] = torch.cat([s.chunk(2, 0)[1] for s in shards])
        out[n + "feed_forward.w2.weight"] = full[m + "mlp.linear_fc2.weight"]
    if "decoder.final_layernorm.weight" in full:
        out["norm.weight"] = full["decoder.final_layernorm.weight"]
    if "output_layer.weight" in full:
        out["tok_embeddings.weight" if args.tie_embeddings else "output.weight"] = full["output_layer.weight"]
    return out


def tp_concat_dim(name: str) -> int | None:
    """Along which dim megatron shards `name` over TP (None: replicated)."""
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    if name.endswith(
        ("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")
    ):
        return 0
    return None


def chunk_layers(n_layers: int, pp: int, vp: int, pp_rank: int, chunk: int) -> list[int]:
    """Global layers of model chunk `chunk` on pipeline rank `pp_rank` (megatron's even split: chunk v
    of every stage comes before chunk v+1 of any stage)."""
    per = n_layers // (pp * vp)
    first = chunk * (n_layers // vp) + pp_rank * per
    return list(range(first, first + per))


def engine_files_to_native(
    shards: dict[tuple[int, int], dict[str, torch.Tensor]], args: TransformerArgs, tp: int, pp: int, vp: int
) -> dict[str, torch.Tensor]:
    """Native weights from the megatron engine's per-(tp, pp) files ({(tp_rank, pp_rank): tensors}, keys
    `model.chunk<v>.<megatron name>`): gather TP shards, convert every chunk, merge the stages."""
    out: dict[str, torch.Tensor] = {}
    for p in range(pp):
        for v in range(vp):
            prefix = f"model.chunk{v}."
            names = [k[len(prefix) :] for k in shards[(0, p)] if k.startswith(prefix)]
            full = {}
            for name in names:
                parts = [shards[(t, p)][prefix + name] for t in range(tp)]
                dim = tp_concat_dim(name)
                full[name] = parts[0] if dim is None or tp == 1 else torch.cat(parts, dim)
            out.update(from_megatron(full, args, chunk_layers(args.n_layers, pp, vp, p, v), tp=tp))
    return out
