"""Fused RMSNorm (+ residual add) and RoPE + paged KV write.

- `rms_norm` replaces `torch_ref.rms_norm`; `add_rms_norm` fuses the residual add before it (the attention
  side's `hidden = hidden + delta; x = rms_norm(hidden)`), one read of each input and one write of each output.
- `rope_write_kv` replaces `torch_ref.apply_rope` on q and k plus `torch_ref.write_kv` of k and v: q is
  rotated in place, k is rotated on its way into the cache (the rotated k is only ever read from there).

Both rope styles produce `torch_ref.apply_rope`'s output layout: the rotated "first" components in the first
half of the head dim, the "second" in the second half. Neox pairs are (x[i], x[i + dim/2]); DeepSeek's
interleaved pairs are (x[2i], x[2i + 1]), written out evens-then-odds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crosspool.kernels import pdl
from crosspool.kernels._common import next_pow2
from crosspool.kernels.pdl import enter as pdl_enter
from crosspool.models.batch import TopKPartials


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, TOP_K: tl.constexpr = 0,
    USE_PDL: tl.constexpr = False,
):
    """TOP_K > 0: x is a fused MoE's per-expert rows (row t * TOP_K + k); their fp32 sum in order, rounded to the
    residual's dtype, is the x added to the residual (what `fused_moe.topk_sum` would have stored)."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n_cols
    if TOP_K > 0:
        acc = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(TOP_K):
            acc += tl.load(x_ptr + (row * TOP_K + k) * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        x = acc.to(res_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        # add in fp32 and round to the stream's dtype (as torch does); the normed input is that rounded sum
        r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + r).to(x.dtype)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    # as the reference: normalize in fp32, round to the input dtype, then scale by the weight
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_in = x2 if residual is None else residual.reshape(-1, n)
    res_out = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res_in, weight, out, res_out, n, eps,
            x2.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=next_pow2(n), num_warps=4 if n <= 2048 else 8,
            **pdl.options(x.device),
        )
    return out.view(shape), (res_out.view(shape) if residual is not None else None)


def topk_add_rms_norm(delta: TopKPartials, residual: torch.Tensor, weight: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm(delta.reduce(), residual, weight, eps)` in one kernel: the top-k sum of the FFN's expert rows
    is done while adding them to the residual, bit for bit as the two kernels would."""
    assert delta.dtype == residual.dtype and delta.y.stride(-1) == 1 and weight.is_contiguous()
    n = residual.shape[-1]
    res = residual.reshape(-1, n)
    out = torch.empty(res.shape, dtype=torch.promote_types(weight.dtype, residual.dtype), device=res.device)
    res_out = torch.empty_like(res)
    if res.shape[0] > 0:
        _rms_norm_kernel[(res.shape[0],)](
            delta.y, res, weight, out, res_out, n, eps,
            delta.y.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=True, BLOCK=next_pow2(n), TOP_K=delta.top_k, num_warps=4 if n <= 2048 else 8,
            **pdl.options(res.device),
        )
    return out.view(residual.shape), res_out.view(residual.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] (rows may be strided, last dim contiguous), weight [N] -> weight * normalize(x), like
    `torch_ref.rms_norm` (also for per-head q/k norm: x [T, heads, head_dim])."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x) with x, residual [T, N]: the sum is rounded to x's dtype once."""
    out, res = _norm(x, residual, weight, eps)
    assert res is not None
    return out, res


@triton.jit
def _load_halves(x_ptr, head_offs, ok, w_ptr, num_heads, eps, row_sq, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 INTERLEAVED: tl.constexpr, NORM: tl.constexpr):
    """One token's heads as the two rope halves [BLOCK_H, BLOCK_HALF] (fp32), RMS-normed first when NORM is
    1 (per head, weight [dim]), 2 (over all heads, all of them loaded here, weight [heads * dim]) or 3 (as 2,
    but only some heads are loaded here: `row_sq` is the whole row's `_sum_squares`), rounded as
    `torch_ref.rms_norm` rounds (normalize in fp32, round to the input dtype, scale by the weight, round again)."""
    offs = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        first, second = 2 * offs, 2 * offs + 1
    else:
        first, second = offs, offs + HALF
    x1 = tl.load(x_ptr + head_offs[:, None] + first[None, :], mask=ok, other=0.0)
    x2 = tl.load(x_ptr + head_offs[:, None] + second[None, :], mask=ok, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if NORM > 0:
        sq = x1 * x1 + x2 * x2
        if NORM == 1:
            rstd = tl.rsqrt(tl.sum(sq, 1) / (2 * HALF) + eps)[:, None]
            w_row = tl.zeros_like(head_offs)[:, None]
        else:
            if NORM == 2:
                row_sq = tl.sum(tl.sum(sq, 1), 0)
            rstd = tl.rsqrt(row_sq / (2 * HALF * num_heads) + eps)
            w_row = head_offs[:, None]     # heads are contiguous in the row (checked by the wrapper)
        w1 = tl.load(w_ptr + w_row + first[None, :], mask=ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + w_row + second[None, :], mask=ok, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return x1, x2


@triton.jit
def _sum_squares(x_ptr, head_offs, ok, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """fp32 sum of squares of a token's heads, summed in `_load_halves`'s order for NORM 2 (so NORM 3 over a
    subset of the heads normalizes them as NORM 2 over all of them does)."""
    x1, x2 = _load_halves(x_ptr, head_offs, ok, x_ptr, 1, 0.0, 0.0, HALF, BLOCK_HALF, INTERLEAVED, 0)
    return tl.sum(tl.sum(x1 * x1 + x2 * x2, 1), 0)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, q_norm_ptr, k_norm_ptr, eps,
    num_q_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, PAGE_SIZE: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_V: tl.constexpr, NORM: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_half = tl.arange(0, BLOCK_HALF)
    half_ok = offs_half < HALF
    c = tl.load(cos_ptr + t * stride_ct + offs_half, mask=half_ok, other=0.0)
    s = tl.load(sin_ptr + t * stride_st + offs_half, mask=half_ok, other=0.0)
    # the reference multiplies by cos/sin rounded to the activations' dtype
    c = c.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
    s = s.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]

    hq = tl.arange(0, BLOCK_HQ)
    q_ok = (hq < num_q_heads)[:, None] & half_ok[None, :]
    q_rows = q_ptr + t * stride_qt + hq * stride_qh
    x1, x2 = _load_halves(q_ptr + t * stride_qt, hq * stride_qh, q_ok, q_norm_ptr, num_q_heads, eps, 0.0, HALF,
                          BLOCK_HALF, INTERLEAVED, NORM)
    # in place: interleaved output positions are loaded by other threads, so all loads land before any store
    tl.debug_barrier()
    tl.store(q_rows[:, None] + offs_half[None, :], (x1 * c - x2 * s).to(q_ptr.dtype.element_ty), mask=q_ok)
    tl.store(q_rows[:, None] + HALF + offs_half[None, :], (x2 * c + x1 * s).to(q_ptr.dtype.element_ty), mask=q_ok)

    slot = tl.load(slots_ptr + t)
    if slot >= 0:   # negative slots: padding tokens (e.g. of a CUDA graph bucket) write nothing
        page = slot // PAGE_SIZE
        offset = slot % PAGE_SIZE
        hk = tl.arange(0, BLOCK_HKV)
        hk_valid = hk < num_kv_heads
        k_ok = hk_valid[:, None] & half_ok[None, :]
        k1, k2 = _load_halves(k_ptr + t * stride_kt, hk * stride_kh, k_ok, k_norm_ptr, num_kv_heads, eps, 0.0,
                              HALF, BLOCK_HALF, INTERLEAVED, NORM)
        # the reference rounds the normed k to the activations' dtype before rotating, and the rotation to it
        kc_rows = k_cache_ptr + page * stride_kcb + offset * stride_kcs + hk * stride_kch
        kc_dtype = k_cache_ptr.dtype.element_ty
        tl.store(kc_rows[:, None] + offs_half[None, :], (k1 * c - k2 * s).to(k_ptr.dtype.element_ty).to(kc_dtype),
                 mask=k_ok)
        tl.store(kc_rows[:, None] + HALF + offs_half[None, :],
                 (k2 * c + k1 * s).to(k_ptr.dtype.element_ty).to(kc_dtype), mask=k_ok)
        if HAS_V:
            offs_dv = tl.arange(0, BLOCK_DV)
            v_ok = hk_valid[:, None] & (offs_dv < DV)[None, :]
            v = tl.load(v_ptr + t * stride_vt + hk[:, None] * stride_vh + offs_dv[None, :], mask=v_ok)
            vc_rows = v_cache_ptr + page * stride_vcb + offset * stride_vcs + hk * stride_vch
            tl.store(vc_rows[:, None] + offs_dv[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=v_ok)


def qk_norm_args(qk_norm: tuple[str, torch.Tensor, torch.Tensor, float] | None, q: torch.Tensor, k: torch.Tensor,
                 full: int) -> tuple[int, torch.Tensor, torch.Tensor, float]:
    """(NORM constexpr, q weight, k weight, eps) for a kernel from ("head" | "full", q_w, k_w, eps) or None (no
    norm: the weights are placeholders). `full`: the kernel's code for OLMoE's norm over all heads."""
    if qk_norm is None:
        return 0, q, k, 0.0
    kind, q_w, k_w, eps = qk_norm
    assert q_w.is_contiguous() and k_w.is_contiguous()
    assert q.stride(1) == q.shape[-1] and k.stride(1) == k.shape[-1], "normed q/k: heads must be contiguous in a row"
    return {"head": 1, "full": full}[kind], q_w, k_w, eps


def rope_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
    slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None, interleaved: bool,
    qk_norm: tuple[str, torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Rotate q in place, rotate k into k_cache and copy v into v_cache at the tokens' slots.

    qk_norm: (kind, q weight, k weight, eps) RMS-normalizes q and k first, as `torch_ref.rms_norm` would:
    kind "head" (per head, weights [dim]) or "full" (over all heads, weights [heads * dim]).

    q [T, Hq, Rd], k [T, Hkv, Rd], v [T, Hkv, Dv] (strided rows/heads allowed, last dim contiguous);
    cos/sin [T, Rd/2] fp32 (`torch_ref.rope_cos_sin`); slot_mapping [T] (block * block_size + offset, < 0 to
    skip); k_cache [blocks, block_size, Hkv, Rd], v_cache [blocks, block_size, Hkv, Dv] (strided pool views).
    MLA: q = q[..., nope:], k = k_pe [T, 1, Rd], v = normed latent [T, 1, R], k_cache = latent_cache[..., R:],
    v_cache = latent_cache[..., :R]. Returns q."""
    t, hq, rd = q.shape
    hkv = k.shape[1]
    assert rd % 2 == 0 and k.shape[2] == rd and k_cache.shape[-1] == rd
    for x in (q, k, v, k_cache, v_cache):
        assert x is None or x.stride(-1) == 1, "last dim must be contiguous"
    if t == 0:
        return q
    v_arg = k if v is None else v
    vc_arg = k_cache if v_cache is None else v_cache
    dv = v_arg.shape[-1]
    norm, q_w, k_w, eps = qk_norm_args(qk_norm, q, k, full=2)
    _rope_write_kv_kernel[(t,)](
        q, k, v_arg, cos, sin, slot_mapping, k_cache, vc_arg, q_w, k_w, eps, hq, hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v_arg.stride(0), v_arg.stride(1),
        cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), vc_arg.stride(0), vc_arg.stride(1), vc_arg.stride(2),
        HALF=rd // 2, BLOCK_HALF=next_pow2(rd // 2), DV=dv, BLOCK_DV=next_pow2(dv),
        BLOCK_HQ=next_pow2(hq), BLOCK_HKV=next_pow2(hkv), PAGE_SIZE=k_cache.shape[1],
        INTERLEAVED=interleaved, HAS_V=v is not None, NORM=norm, **pdl.options(q.device),
    )
    return q
