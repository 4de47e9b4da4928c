"""Fused MoE routing: replaces `torch_ref.route` for the greedy rules (softmax or sigmoid scores, top-k,
optional renormalization over the chosen k, routed scaling) in one kernel per batch.

One program per token, one warp (ROUTE_WARPS): the router logits row [E] is loaded once, scored, and the k best
experts are picked by k rounds of one max over (score, index) keys (the lowest index wins a tie, as `torch.topk`
does on CUDA in practice; a warp reduces with shuffles alone, where four warps would pass through shared memory
and barriers each round); weights are
the chosen scores, renormalized when the rule asks. Mixtral's "softmax over the top-k logits" equals the
softmax scores renormalized over the top k. Group-limited rules (DeepSeek-V3 `noaux_tc`, V2
`group_limited_greedy`) stay on the torch reference.

At decode sizes the router itself is the skinny GEMM (`kernels.gemv`), split over K; `route_linear` hands its
fp32 partials to this kernel, which sums them before scoring (one kernel fewer per MoE layer than the GEMM's own
sum kernel followed by `route`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crosspool.kernels import pdl
from crosspool.kernels._common import env_int, next_pow2
from crosspool.kernels.pdl import enter as pdl_enter
from crosspool.models.spec import RoutingSpec

# warps per routing program (CROSSPOOL_ROUTE_WARPS): 1 for up to 256 experts (at most 8 scores a thread)
ROUTE_WARPS = env_int("CROSSPOOL_ROUTE_WARPS", 1, minimum=1)


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, ids_ptr, round_ptr, num_experts, stride_l, stride_s, scale, eps,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr,
    NORMALIZE: tl.constexpr, SPLIT: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """One token's routing (`route_row`)."""
    pdl_enter(USE_PDL)
    route_row(logits_ptr, weights_ptr, ids_ptr, round_ptr, tl.program_id(0).to(tl.int64), num_experts, stride_l,
              stride_s, scale, eps, TOP_K, BLOCK_K, BLOCK_E, SIGMOID, NORMALIZE, SPLIT)


@triton.jit
def route_row(logits_ptr, weights_ptr, ids_ptr, round_ptr, t, num_experts, stride_l, stride_s, scale, eps,
              TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr,
              NORMALIZE: tl.constexpr, SPLIT: tl.constexpr):
    """Token t's routing. SPLIT == 0: logits_ptr holds the logits [T, E]; SPLIT > 0: the router's skinny-GEMM
    partials [SPLIT, T, E] (fp32), summed here in order and rounded to round_ptr's dtype, as `gemv` would."""
    offs = tl.arange(0, BLOCK_E)
    ok = offs < num_experts
    if SPLIT == 0:
        x = tl.load(logits_ptr + t * stride_l + offs, mask=ok, other=float("-inf")).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_E], tl.float32)
        for part in tl.static_range(SPLIT):
            acc += tl.load(logits_ptr + part * stride_s + t * stride_l + offs, mask=ok, other=0.0)
        x = tl.where(ok, acc.to(round_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
    if SIGMOID:
        s = tl.sigmoid(x)
    else:
        e = tl.exp(x - tl.max(x, 0))
        s = e / tl.sum(e, 0)
    # one max per round: scores are >= 0, so their fp32 bits order as integers; the low half ranks the index
    # (the lowest index wins a tie); padding lanes and chosen experts are -1, below every score
    key = (s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - offs).to(tl.int64)
    key = tl.where(ok, key, -1)
    k_offs = tl.arange(0, BLOCK_K)
    w = tl.zeros([BLOCK_K], tl.float32)
    ids = tl.zeros([BLOCK_K], tl.int64)
    for k in tl.static_range(TOP_K):
        top = tl.max(key, 0)
        bits = top >> 32
        idx = BLOCK_E - 1 - (top - (bits << 32))
        best = bits.to(tl.int32).to(tl.float32, bitcast=True)
        w = tl.where(k_offs == k, best, w)
        ids = tl.where(k_offs == k, idx, ids)
        key = tl.where(offs == idx, -1, key)
    if NORMALIZE:
        w = w / (tl.sum(w, 0) + eps)
    k_ok = k_offs < TOP_K
    tl.store(weights_ptr + t * TOP_K + k_offs, w * scale, mask=k_ok)
    tl.store(ids_ptr + t * TOP_K + k_offs, ids, mask=k_ok)


def supports(routing: RoutingSpec) -> bool:
    return routing.topk_method == "greedy"


def route(logits: torch.Tensor, routing: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int64), as `torch_ref.route`."""
    assert logits.stride(-1) == 1
    return _route(logits, 0, logits, routing)


def route_linear(x: torch.Tensor, router: torch.Tensor, routing: RoutingSpec, *, split_k: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`route(x @ router^T)` for decode-sized x (`gemv.applies`), in two kernels instead of three: the skinny
    GEMM's K-split partials are summed by the routing kernel (the same sum, order and rounding as `gemv`'s own
    second kernel, so the result is bit for bit `route(gemv(x, router))`)."""
    from crosspool.kernels import gemv

    part, split = gemv.gemv_parts(x, router, split_k=split_k)
    return _route(part, 0 if split == 1 else split, x, routing)


def norm_route_linear(delta: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      router: torch.Tensor, routing: RoutingSpec, *, split_k: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route_linear(x, router, routing)` with x, h = `norm_rope.add_rms_norm(delta, residual, norm_weight, eps)`
    done inside the router's GEMV (`gemv.norm_gemv_parts`): two kernels for the post-attention norm, the router
    and the routing. Returns (x, h, weights, ids)."""
    from crosspool.kernels import gemv

    x, h, part, split = gemv.norm_gemv_parts(delta, residual, norm_weight, eps, router, split_k=split_k)
    weights, ids = _route(part, 0 if split == 1 else split, x, routing)
    return x, h, weights, ids


def _route(logits: torch.Tensor, split: int, dtype_of: torch.Tensor, routing: RoutingSpec
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (split 0) or K-split partials [split, T, E]; dtype_of: a tensor of the logits' dtype."""
    assert supports(routing), "group-limited routing uses torch_ref.route"
    t, e = logits.shape[-2:]
    k = routing.top_k
    weights = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    if t:
        sigmoid = routing.scoring == "sigmoid"
        _route_kernel[(t,)](
            logits, weights, ids, dtype_of, e, logits.stride(-2), logits.stride(0) if split else 0,
            float(routing.routed_scaling_factor), 1e-20 if sigmoid else 0.0,
            TOP_K=k, BLOCK_K=next_pow2(k), BLOCK_E=next_pow2(e), SIGMOID=sigmoid, NORMALIZE=routing.norm_topk_prob,
            SPLIT=split, num_warps=max(ROUTE_WARPS, next_pow2(e) // 256), **pdl.options(logits.device),
        )
    return weights, ids
