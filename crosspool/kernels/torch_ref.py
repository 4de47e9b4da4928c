"""Plain torch reference ops: the executable definition every fast kernel is tested against.

Each function here is written for clarity and exactness (it reproduces HF transformers' math), runs on
CPU and GPU, and is the execution path when no faster kernel is selected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crosspool.models.spec import RopeSpec, RoutingSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, b)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------------
# RoPE

def rope_inv_freq(rope: RopeSpec) -> torch.Tensor:
    """Inverse frequencies (fp32, dim/2), YaRN-blended when the spec asks for it."""
    dim, base = rope.dim, rope.theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.scaling != "yarn":
        return 1.0 / pos_freqs
    import math

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # keeps the ramp finite
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def rope_cos_sin(
    rope: RopeSpec, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, dim/2] in fp32 (with YaRN's attention factor folded in)."""
    return cos_sin(positions, inv_freq.to(positions.device), rope.cos_sin_scale())


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin(position * inv_freq) * scale, [T, dim/2] fp32."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos() * scale, freqs.sin() * scale


def feed_ids(ids: torch.Tensor, src_rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A decode step's input ids: row b takes tokens[src_rows[b]] where src_rows[b] >= 0 (async decode: the token
    a previous step sampled, still on the device), else ids[b]."""
    return torch.where(src_rows >= 0, tokens[src_rows.clamp(min=0)], ids)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [T, heads, dim] by per-token angles. Interleaved (DeepSeek) input pairs are (x0, x1), (x2,
    x3)...; the output puts the rotated evens first and odds second, the same permutation for q and k, so
    dot products equal those of transformers' layouts."""
    dtype = x.dtype
    c, s = cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


# ------------------------------------------------------------------------------------------------
# Paged attention

def write_kv(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Store values [T, heads, dim] into a paged cache view [blocks, block_size, heads, dim] at flat slots."""
    block_size = cache.shape[1]
    cache[slots // block_size, slots % block_size] = values.to(cache.dtype)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Paged cache [blocks, block_size, heads, dim] + tables [B, max_blocks]
    -> keys/values [B, max_blocks * block_size, heads, dim] in sequence order."""
    b, nb = block_tables.shape
    g = cache[block_tables.clamp(min=0)]
    return g.reshape(b, nb * cache.shape[1], *cache.shape[2:])


def padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_seq: torch.Tensor, q_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of flat queries q [T, Hq, D] against per-sequence keys k [B, L, Hkv, D] / values
    v [B, L, Hkv, Dv]. Token t belongs to sequence q_seq[t] at absolute position q_pos[t]; it sees keys at
    positions <= q_pos[t]. Returns [T, Hq, Dv]. Processes one sequence at a time to bound memory."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    group = q.shape[1] // k.shape[2]
    for b in torch.unique(q_seq).tolist():
        idx = (q_seq == b).nonzero().squeeze(1)
        pos = q_pos[idx]
        n_keys = int(pos.max()) + 1
        kb = k[b, :n_keys].repeat_interleave(group, dim=1).transpose(0, 1)        # [Hq, L, D]
        vb = v[b, :n_keys].repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[idx].transpose(0, 1)                                                # [Hq, t, D]
        scores = torch.matmul(qb, kb.transpose(1, 2)) * scale
        mask = torch.arange(n_keys, device=q.device)[None, :] > pos[:, None]
        scores = scores.masked_fill(mask[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[idx] = torch.matmul(probs, vb).transpose(0, 1)
    return out


# ------------------------------------------------------------------------------------------------
# MoE

def route(
    logits: torch.Tensor, routing: RoutingSpec, score_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] fp32, expert ids [T, k]) by the family's rule."""
    logits = logits.float()
    t, e = logits.shape
    k = routing.top_k
    if routing.scoring == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = torch.softmax(logits, dim=-1)
    if routing.topk_method == "greedy":
        weights, ids = torch.topk(scores, k, dim=-1)
    else:
        choice = scores + score_bias.float() if score_bias is not None else scores
        grouped = choice.view(t, routing.n_group, e // routing.n_group)
        if routing.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
        else:
            group_scores = grouped.max(dim=-1).values
        top_groups = torch.topk(group_scores, routing.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, top_groups, 1.0)
        keep = group_mask[:, :, None].expand_as(grouped).reshape(t, e).bool()
        fill = float("-inf") if routing.topk_method == "noaux_tc" else 0.0
        ids = torch.topk(choice.masked_fill(~keep, fill), k, dim=-1)[1]
        weights = scores.gather(1, ids)
    if routing.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if routing.scoring == "sigmoid" else 0.0))
    return weights * routing.routed_scaling_factor, ids


def experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
            ids: torch.Tensor) -> torch.Tensor:
    """Sum over each token's chosen experts of weight * down(silu(gate x) * up x). Loops over the experts
    the batch hits, like transformers' eager path. Accumulates in fp32."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0]).tolist()
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        tok = sel // ids.shape[1]
        h = silu_and_mul(F.linear(x[tok], w_gate_up[expert]))
        y = F.linear(h, w_down[expert])
        out.index_add_(0, tok, (y * weights.reshape(-1)[sel, None].to(y.dtype)).float())
    return out.to(x.dtype)
