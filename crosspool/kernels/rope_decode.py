"""Decode attention with RoPE, q/k norm and the KV write inside (MHA/GQA): `norm_rope.rope_write_kv` followed by
`paged_attention.paged_decode_attention`, as one kernel launch instead of two per layer.

Used by `models.attention_side` for decode steps of at most `FUSED_ROPE_ROWS` rows (default 1). Timed on the H200
(session 7, OLMoE ctx 1k): batch 1 1.16 -> 1.12 ms, but batch 2/4/8 1.58/2.20/3.34 -> 1.60/2.29/3.52 ms, where the
two-kernel path wins (the fused kernel rotates each q head once per split program). CROSSPOOL_FUSED_ROPE_ROWS in
the environment (which spawned ranks inherit) sets the limit: 0 turns it off. The torch reference is the
two-kernel path it replaces (and `torch_ref` beneath that); tests compare the output and the caches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crosspool.kernels import pdl
from crosspool.kernels._common import block_dim, cdiv, dot_precision, env_int, next_pow2
from crosspool.kernels.norm_rope import _load_halves, _sum_squares, qk_norm_args
from crosspool.kernels.paged_attention import (
    DECODE_WARPS,
    LOG2E,
    SplitPlan,
    _attend,
    _combine,
    _split_outputs,
    _store_rows,
    _tiles,
    split_keys,
    split_plan,
)
from crosspool.kernels.pdl import enter as pdl_enter

FUSED_ROPE_ROWS = env_int("CROSSPOOL_FUSED_ROPE_ROWS", 1)
# keys per block of this kernel's cache walk (heads of <= 256 dims; CROSSPOOL_FUSED_BLOCK_N). 128 is faster on the
# H200 than the plain kernel's 64 (OLMoE batch 1 at 1k, docs/benchmarks.md section 7: the kernel alone 10.9 -> 9.7
# us; a decode step 1.12 -> 1.10 ms in session 10's same-call comparison, its GPU tests passed).
BLOCK_N_KEYS = env_int("CROSSPOOL_FUSED_BLOCK_N", 128, minimum=16)
# Tried and removed (session 12): every prologue load (q, k, v, norm weights, cos/sin, slot) issued before the
# first wait, and the new key's norm after the cache walk. Its sm_90 code did issue them in one burst, but the
# kernel alone took 10.6 against 10.2-10.7 us, unsplit 26.2 against 21.5, and a batch-1 OLMoE step 1.08 against
# 1.06 ms (the raw values stay live in registers across the walk). docs/benchmarks.md section 7, session 12.


def fused_for(rows: int) -> bool:
    """Whether a decode step of `rows` rows (its graph bucket, padding included) takes the fused kernel."""
    return rows <= FUSED_ROPE_ROWS


@triton.jit
def _normed_halves(row, head_offs, mask, stride_h, norm_ptr, num_heads, eps, BLOCK_HEADS: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, NORM: tl.constexpr):
    """The (normed) rotation halves of the heads at `head_offs` of one token's q or k row; with the norm over all
    heads (NORM 3) the row's sum of squares over its `num_heads` heads first."""
    sq = 0.0
    if NORM == 3:
        heads = tl.arange(0, BLOCK_HEADS)
        every = (heads < num_heads)[:, None] & (tl.arange(0, BLOCK_HALF) < HALF)[None, :]
        sq = _sum_squares(row, heads * stride_h, every, HALF, BLOCK_HALF, INTERLEAVED)
    return _load_halves(row, head_offs, mask, norm_ptr, num_heads, eps, sq, HALF, BLOCK_HALF, INTERLEAVED, NORM)


@triton.jit
def _walk_range(ctx, split, NUM_SPLITS: tl.constexpr, wave_splits, target_keys, BLOCK_N: tl.constexpr):
    """This split's share of [0, ctx) as in `_paged_attention_kernel` (per_split, lo), and where its cache walk
    stops: before ctx - 1, the new token, which is folded in from registers."""
    per_split = split_keys(ctx, NUM_SPLITS, wave_splits, target_keys, BLOCK_N)
    lo = split * per_split
    return per_split, lo, tl.minimum(lo + per_split, ctx - 1)


@triton.jit
def _rope_decode_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, q_norm_ptr, k_norm_ptr, eps,
    k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
    scale_log2, num_q_heads, num_kv_heads, wave_splits, target_keys,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
    stride_kb, stride_ks, stride_kch, stride_vb, stride_vs, stride_vch,
    stride_bt,
    stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh,
    GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, INTERLEAVED: tl.constexpr, NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Decode attention with `rope_write_kv` folded in: the program of (sequence, KV head, head block, split)
    norms and rotates its q heads itself, and the new token (position ctx - 1) is not read from the cache.

    Why not write first and read back: the programs of the split that holds position ctx - 1 would read it
    while the writing program may not have stored it yet (no ordering between programs of one launch). Instead
    every split's walk over the cache stops before ctx - 1, and the split that owns ctx - 1 norms and rotates
    the new k itself and folds (k, v) into its softmax from registers; its first head block also stores them
    into the cache (exactly one writer per sequence and KV head), for the steps after this one. The rope layout
    is `torch_ref.apply_rope`'s (rotated halves first and second), so q @ k runs as two dots over the halves,
    as MLA's latent + rope parts do. Padding rows (context_len 0) own no position: no write, zeros out."""
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    seq = tl.program_id(1)
    split = pid % NUM_SPLITS
    head_block = (pid // NUM_SPLITS) % HEAD_BLOCKS
    kv_head = pid // (NUM_SPLITS * HEAD_BLOCKS)
    t = seq.to(tl.int64)
    ctx = tl.load(context_lens_ptr + seq)
    group_head = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = group_head < GROUP
    head = kv_head * GROUP + group_head
    tok = tl.zeros([BLOCK_H], tl.int64) + t
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    per_split, lo, hi = _walk_range(ctx, split, NUM_SPLITS, wave_splits, target_keys, BLOCK_N)
    if lo >= ctx:       # an empty split (past the context, or a padding row): nothing to norm, rotate or read
        _store_rows(m, l_sum, acc, out_ptr, lse_ptr, tok, head, row_ok, split, stride_ot, stride_oh, stride_os,
                    stride_lt, stride_lh, DV, BLOCK_DV, NUM_SPLITS)
        return
    offs_half = tl.arange(0, BLOCK_HALF)
    half_ok = offs_half < HALF
    # as `rope_write_kv`: cos/sin rounded to the activations' dtype, normed q/k rounded before the rotation
    dtype = q_ptr.dtype.element_ty
    c = tl.load(cos_ptr + t * stride_ct + offs_half, mask=half_ok, other=0.0).to(dtype).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * stride_st + offs_half, mask=half_ok, other=0.0).to(dtype).to(tl.float32)[None, :]

    x1, x2 = _normed_halves(q_ptr + t * stride_qt, head * stride_qh, row_ok[:, None] & half_ok[None, :], stride_qh,
                            q_norm_ptr, num_q_heads, eps, BLOCK_HQ, HALF, BLOCK_HALF, INTERLEAVED, NORM)
    q1 = (x1 * c - x2 * s).to(dtype)
    q2 = (x2 * c + x1 * s).to(dtype)

    # the new token's k (this KV head, as a one-row tile), rounded as the cache stores it, and its v
    one = tl.zeros([1], tl.int32)
    k_ok = (one == 0)[:, None] & half_ok[None, :]
    k1, k2 = _normed_halves(k_ptr + t * stride_kt, one + kv_head * stride_kh, k_ok, stride_kh, k_norm_ptr,
                            num_kv_heads, eps, BLOCK_HKV, HALF, BLOCK_HALF, INTERLEAVED, NORM)
    kc_dtype = k_cache_ptr.dtype.element_ty
    kr1 = (k1 * c - k2 * s).to(k_ptr.dtype.element_ty).to(kc_dtype)
    kr2 = (k2 * c + k1 * s).to(k_ptr.dtype.element_ty).to(kc_dtype)
    offs_dv = tl.arange(0, BLOCK_DV)
    v_ok = (one == 0)[:, None] & (offs_dv < DV)[None, :]
    v_new = tl.load(v_ptr + t * stride_vt + kv_head * stride_vh + one[:, None] + offs_dv[None, :], mask=v_ok,
                    other=0.0).to(v_cache_ptr.dtype.element_ty)

    owner = (lo <= ctx - 1) & (ctx - 1 < lo + per_split)
    q_pos = tl.zeros([BLOCK_H], tl.int32) + (ctx - 1)
    m, l_sum, acc = _attend(q1, q2, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kv_head, lo,
                            hi, q_pos, m, l_sum, acc, scale_log2,
                            stride_kb, stride_ks, stride_kch, stride_vb, stride_vs, stride_vch, stride_bt,
                            HALF, BLOCK_HALF, HALF, BLOCK_HALF, DV, BLOCK_DV, False, PAGE_SIZE, BLOCK_N,
                            DOT_PRECISION)

    # the new token's key and value, folded in by the owner only (-inf elsewhere: alpha 1, p 0)
    s_new = tl.sum(q1.to(tl.float32) * kr1.to(tl.float32), 1) + tl.sum(q2.to(tl.float32) * kr2.to(tl.float32), 1)
    s_new = tl.where(owner, s_new * scale_log2, float("-inf"))
    m_new = tl.maximum(m, s_new)
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_shift)
    p = tl.exp2(s_new - m_shift)
    l_sum = l_sum * alpha + p
    # probabilities rounded to the value dtype before the product, as the cache walk's P @ V
    acc = acc * alpha[:, None] + p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)
    m = m_new

    slot = tl.load(slots_ptr + seq)
    if owner & (head_block == 0) & (slot >= 0):     # one writer per (sequence, KV head); padding slots are < 0
        page = slot // PAGE_SIZE
        offset = slot % PAGE_SIZE
        kc_rows = k_cache_ptr + page * stride_kb + offset * stride_ks + kv_head * stride_kch + one[:, None]
        tl.store(kc_rows + offs_half[None, :], kr1, mask=k_ok)
        tl.store(kc_rows + HALF + offs_half[None, :], kr2, mask=k_ok)
        vc_rows = v_cache_ptr + page * stride_vb + offset * stride_vs + kv_head * stride_vch + one[:, None]
        tl.store(vc_rows + offs_dv[None, :], v_new, mask=v_ok)

    _store_rows(m, l_sum, acc, out_ptr, lse_ptr, tok, head, row_ok, split, stride_ot, stride_oh, stride_os,
                stride_lt, stride_lh, DV, BLOCK_DV, NUM_SPLITS)


def rope_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, interleaved: bool,
    qk_norm: tuple[str, torch.Tensor, torch.Tensor, float] | None = None, *,
    num_splits: int | SplitPlan | None = None,
    max_context_len: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`norm_rope.rope_write_kv` then `paged_decode_attention`, with the first folded into the second's kernel
    (MHA/GQA decode: one launch fewer per layer). q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, Dv] un-rotated (q is
    left as it is); cos/sin [B, D/2]; slot_mapping [B]; qk_norm and the rest as those two functions. The new
    token's key and value land in the caches as `rope_write_kv` would write them; returns [B, Hq, Dv]."""
    b, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    dv = v_cache.shape[-1]
    assert hq % hkv == 0 and d % 2 == 0 and k.shape[1:] == (hkv, d) and k_cache.shape[-1] == d
    assert context_lens.shape[0] == b, "decode: row b is sequence b's one new token"
    for x in (q, k, v, k_cache, v_cache):
        assert x.stride(-1) == 1, "last dim must be contiguous"
    group = hq // hkv
    _, block_h, block_n = _tiles(True, group, dv)
    if dv <= 256:
        block_n = BLOCK_N_KEYS
    head_blocks = cdiv(group, block_h)
    plan = split_plan(num_splits, b * hkv * head_blocks, q.device, max_context_len)
    num_splits = plan.splits
    if out is None:
        out = q.new_empty(b, hq, dv)
    # "full" (OLMoE) norms over all heads: each program sums the whole row's squares itself (NORM 3)
    norm, q_w, k_w, eps = qk_norm_args(qk_norm, q, k, full=3)
    target, lse, (stride_os, stride_lt, stride_lh) = _split_outputs(out, num_splits)
    _rope_decode_kernel[(hkv * head_blocks * num_splits, b)](
        q, k, v, cos, sin, slot_mapping, q_w, k_w, eps,
        k_cache, v_cache, block_tables, context_lens, target, lse,
        scale * LOG2E, hq, hkv, plan.wave_splits, plan.target_keys,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        target.stride(0), target.stride(1), stride_os,
        stride_lt, stride_lh,
        GROUP=group, HEAD_BLOCKS=head_blocks, NUM_SPLITS=num_splits,
        HALF=d // 2, BLOCK_HALF=block_dim(d // 2), DV=dv, BLOCK_DV=block_dim(dv),
        PAGE_SIZE=page_size, BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_HQ=next_pow2(hq), BLOCK_HKV=next_pow2(hkv), INTERLEAVED=interleaved, NORM=norm,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=DECODE_WARPS if block_h <= 32 else 8, **pdl.options(q.device),
    )
    if num_splits > 1:
        _combine(target, lse, out)
    return out
