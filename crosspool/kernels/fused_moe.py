"""Fused MoE experts: replaces `torch_ref.experts` (the routed-expert sum after `torch_ref.route`).

Expert weights as the loader stacks them: w_gate_up [E, 2I, H] (gate rows, then up rows), w_down [E, H, I];
any strides except a contiguous last dim. Routing: topk_weights [T, K] (fp32), topk_ids [T, K].

Two paths, chosen by token count:

- grouped GEMMs (T > SMALL_BATCH_TOKENS): `moe_align` sorts the T*K (token, expert) pairs by expert and pads
  each expert's segment to BLOCK_M rows, so every BLOCK_M-row tile belongs to one expert. `_gate_up_kernel`
  computes silu(x W_gate^T) * (x W_up^T) for a tile of pairs (both halves in one pass over x), storing the
  intermediate [T*K, I] by pair; `_down_kernel` multiplies by W_down^T, scales by the routing weight and stores
  y [T*K, H] by pair; `_topk_sum_kernel` adds each token's K rows. Deterministic (no atomics).
- GEMV (T <= SMALL_BATCH_TOKENS, decode): no sorting; `_gate_up_gemv_kernel` runs one program per (pair,
  I-block), `_down_gemv_kernel` one per (pair, H-block) storing the weighted fp32 row of each pair, and
  `_topk_sum_kernel` adds each token's K rows. Each expert row is read once per pair that routes to it: at a
  few tokens the step reads the routed experts' weights and little else. Programs accumulate elementwise
  products in a [BLOCK_N, BLOCK_K] register tile and reduce once at the end (no per-iteration reductions).
  From TMA_MIN_TOKENS tokens on sm_90+, `_gate_up_gemv_tma_kernel` / `_down_gemv_tma_kernel` instead take their
  weight tiles by TMA several steps ahead into shared memory (`CROSSPOOL_EXPERTS_TMA`). Tiles are autotuned once
  per shape on the GPU.

Accumulation is fp32; the intermediate and y are rounded to x's dtype, as the reference rounds its linears.
Tiles: the grouped GEMMs' rows per tile follow the tokens per expert (`moe_block_m`); their other tile sizes,
warps and pipeline stages, and the GEMV tiles, are autotuned once per shape on the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from crosspool.kernels import pdl, tuning
from crosspool.kernels._common import cdiv, dot_precision, env_int, next_pow2, tma_ok
from crosspool.kernels.pdl import enter as pdl_enter
from crosspool.models.batch import TopKPartials

SMALL_BATCH_TOKENS = 8
# the GEMV path's expert weight loads are marked evict_first in L2 (each is read once a step, and the attention
# side's weights stay in L2 a little longer): +0.5-1% tokens/s on the H200 (OLMoE ctx 1k, batch 1 and 8;
# docs/benchmarks.md section 7, session 7). CROSSPOOL_EXPERTS_EVICT_FIRST=0 turns it off.
EVICT_FIRST = os.environ.get("CROSSPOOL_EXPERTS_EVICT_FIRST", "1") != "0"
# CROSSPOOL_EXPERTS_TMA: the GEMV path's expert weight tiles fetched by TMA, STAGES ahead into shared memory
# (`_gate_up_gemv_tma_kernel`, `_down_gemv_tma_kernel`; no fp32 register tile, no evict_first hint), from
# TMA_MIN_TOKENS tokens, where TMA can read the weights. "auto" (default): tiles autotuned once per shape;
# BLOCK_N,BLOCK_K,STAGES,WARPS: that tile; "0" or "off": never. On the H200 (docs/benchmarks.md section 7, session
# 10; context 1k) autotuned TMA took a decode step at batch 8 from 3.33 to 3.21 ms (OLMoE) and from 4.19 to 4.15
# (Qwen3-30B-A3B, 24 layers). At batch 2 it won for OLMoE (1.57 -> 1.52) but lost for Qwen3 (2.02 -> 2.06-2.14),
# at batch 4 it tied (OLMoE) and at batch 1 it lost (1.10 -> 1.13), so fewer tokens keep the register-tile kernels.
def tma_setting(value: str | None) -> tuple[int, int, int, int] | str | None:
    """CROSSPOOL_EXPERTS_TMA's value as TMA_TILE: "auto" (also unset or empty), None (off), or a tile; anything
    else is a clear error."""
    value = (value or "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "off"):
        return None
    try:
        block_n, block_k, stages, warps = (int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"CROSSPOOL_EXPERTS_TMA={value!r}: expected auto, off or BLOCK_N,BLOCK_K,STAGES,WARPS "
                         "(four integers)") from None
    return block_n, block_k, stages, warps


TMA_TILE = tma_setting(os.environ.get("CROSSPOOL_EXPERTS_TMA"))
TMA_MIN_TOKENS = env_int("CROSSPOOL_EXPERTS_TMA_MIN_TOKENS", 8, minimum=1)


def moe_block_m(num_tokens: int, num_experts: int) -> int:
    """Rows per tile of the grouped-GEMM path (`moe_align` pads each expert's pairs to a multiple of it):
    few tokens per expert -> short tiles, so padding wastes little."""
    per_expert = num_tokens / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, k) pairs by expert, each expert's segment padded to a multiple of block_m.

    Returns sorted_pairs [P] (pair index t * K + k, or T * K for padding) and block_experts [P / block_m]
    (the expert of each tile, -1 past the used length). P = T*K + min(E, T*K) * (block_m - 1) rounded up to
    block_m is a bound known on the host, so nothing here syncs with the device (graph-capturable)."""
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    count_start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(n, device=flat.device) - count_start[expert_of]
    total = cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((total,), n, dtype=torch.long, device=flat.device)
    sorted_pairs.scatter_(0, padded_start[expert_of] + rank, order)
    tile_start = torch.arange(0, total, block_m, device=flat.device)
    block_experts = torch.searchsorted(padded_end, tile_start, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1)
    return sorted_pairs, block_experts


def _gemm_configs() -> list[triton.Config]:
    """Tiles for the grouped-GEMM path (BLOCK_M is fixed by the caller: `moe_align` pads to it), tried once per
    (hidden, intermediate, BLOCK_M) on the GPU; the interpreter (CPU tests) gets one."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for n in (64, 128) for k in (64, 128) for w in (4, 8) for st in (3, 4)]


def fits(n_arg: str, k_arg: str) -> Callable[..., list[triton.Config]]:
    """An autotuner prune for a kernel whose output dimension is the argument `n_arg` and whose reduction
    dimension is `k_arg`: drop tiles larger than the problem along either (past the smallest tile tried). For small
    shapes (the tiny models of tests and parity runs) they only repeat a smaller tile's work, and each costs a
    compile and a timing at startup; real shapes keep every tile."""
    def prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
        def cap(block: str, arg: str) -> int:
            return max(min(c.kwargs[block] for c in configs), next_pow2(int(named_args[arg])))
        n_cap, k_cap = cap("BLOCK_N", n_arg), cap("BLOCK_K", k_arg)
        return [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap]
    return prune


@tuning.autotune(configs=_gemm_configs(), key=["hidden", "inter_size", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": fits("inter_size", "hidden")})
@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, inter_ptr, sorted_pairs_ptr, block_experts_ptr,
    num_pairs, hidden, inter_size,
    stride_xt, stride_we, stride_wn, stride_it,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """inter[pair, n] = silu(x[token] . w[e, n]) * (x[token] . w[e, I + n]) for one tile of pairs of expert e."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter_size
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]     # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + inter_size * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, hidden, BLOCK_K):
        k_ok = offs_k < hidden - k0
        a = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc_g += tl.dot(a, tl.load(g_ptrs + k0, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
        acc_u += tl.dot(a, tl.load(u_ptrs + k0, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(inter_ptr + pairs[:, None].to(tl.int64) * stride_it + offs_n[None, :],
             h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@tuning.autotune(configs=_gemm_configs(), key=["hidden", "inter_size", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": fits("hidden", "inter_size")})
@triton.jit
def _down_kernel(
    inter_ptr, w_ptr, y_ptr, weights_ptr, sorted_pairs_ptr, block_experts_ptr,
    num_pairs, hidden, inter_size,
    stride_it, stride_we, stride_wn, stride_yt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y[pair, n] = weight[pair] * (inter[pair] . w_down[e, n]) for one tile of pairs of expert e."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    rows = pairs.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows[:, None] * stride_it + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, inter_size, BLOCK_K):
        k_ok = offs_k < inter_size - k0
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)
    acc *= tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rows[:, None] * stride_yt + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _topk_sum_kernel(y_ptr, out_ptr, hidden, stride_yt, stride_ot, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr = False):
    """out[t] = sum_k y[t * K + k] in fp32."""
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < hidden
    acc = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + k) * stride_yt + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _gemv_configs() -> list[triton.Config]:
    """Tile choices for the GEMV path, tried once per (hidden, intermediate, top-k) on the GPU; the
    interpreter (CPU tests) gets one. Its 32 rows still split every tiny test model's matrices into several
    tiles (hidden 64, intermediate 96 / 32 / 128), and an interpreted program costs about the same at 16 rows
    as at 32, so it halves the CPU suite's longest tests against 16."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
            for n in (8, 16, 32) for k in (128, 256) for w in (4, 8)]


@triton.jit
def _load_weights(ptrs, mask, STREAM: tl.constexpr):
    """An expert weight tile; with STREAM marked evict_first in L2 (read once a step: let it go before lines
    that will be read again, such as the attention side's weights)."""
    if STREAM:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(ptrs, mask=mask, other=0.0)


@tuning.autotune(configs=_gemv_configs(), key=["hidden", "inter_size", "TOP_K"],
                 prune_configs_by={"early_config_prune": fits("inter_size", "hidden")})
@triton.jit
def _gate_up_gemv_kernel(
    x_ptr, w_ptr, inter_ptr, ids_ptr, hidden, inter_size,
    stride_xt, stride_we, stride_wn, stride_it,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STREAM: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    """One (token, k) pair, BLOCK_N intermediate columns: multiply-and-sum, no tensor cores (M = 1)."""
    pdl_enter(USE_PDL)
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    token = pair // TOP_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter_size
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]   # [BLOCK_N, BLOCK_K]
    u_ptrs = g_ptrs + inter_size * stride_wn
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(0, hidden, BLOCK_K):
        k_ok = offs_k < hidden - k0
        x = tl.load(x_ptr + token * stride_xt + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        w_mask = n_ok[:, None] & k_ok[None, :]
        acc_g += _load_weights(g_ptrs + k0, w_mask, STREAM).to(tl.float32) * x[None, :]
        acc_u += _load_weights(u_ptrs + k0, w_mask, STREAM).to(tl.float32) * x[None, :]
    g = tl.sum(acc_g, 1)
    h = g * tl.sigmoid(g) * tl.sum(acc_u, 1)
    tl.store(inter_ptr + pair * stride_it + offs_n, h.to(inter_ptr.dtype.element_ty), mask=n_ok)


@tuning.autotune(configs=_gemv_configs(), key=["hidden", "inter_size", "TOP_K"],
                 prune_configs_by={"early_config_prune": fits("hidden", "inter_size")})
@triton.jit
def _down_gemv_kernel(
    inter_ptr, w_ptr, y_ptr, ids_ptr, weights_ptr, hidden, inter_size,
    stride_it, stride_we, stride_wn, stride_yt,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STREAM: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    """y[pair, n-block] = weight[pair] * (inter[pair] . w_down[ids[pair], n]) in fp32, one program per
    (pair, H-block) so the grid covers the GPU even for one token; `_topk_sum_kernel` adds the K rows."""
    pdl_enter(USE_PDL)
    pair = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    w_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(0, inter_size, BLOCK_K):
        k_ok = offs_k < inter_size - k0
        h = tl.load(inter_ptr + pair * stride_it + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        acc += _load_weights(w_ptrs + k0, n_ok[:, None] & k_ok[None, :], STREAM).to(tl.float32) * h[None, :]
    out = tl.sum(acc, 1) * tl.load(weights_ptr + pair).to(tl.float32)
    tl.store(y_ptr + pair * stride_yt + offs_n, out, mask=n_ok)


@triton.jit
def _gate_up_gemv_tma_kernel(
    x_ptr, w_desc, inter_ptr, ids_ptr, hidden, inter_size, stride_xt, stride_it,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """`_gate_up_gemv_kernel` with the gate and up tiles [1, BLOCK_N, BLOCK_K] read through the TMA descriptor
    `w_desc` of [E, 2I, H] (zeros past its ends), STAGES ahead, reduced over K at every step. The gate rows of a
    last partial block read up rows; they are never stored."""
    pdl_enter(USE_PDL)
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int32)
    token = pair // TOP_K
    row = tl.program_id(1) * BLOCK_N
    offs_n = row + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    g = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    for k0 in tl.range(0, hidden, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptr + token * stride_xt + k0 + offs_k, mask=offs_k < hidden - k0, other=0.0).to(tl.float32)
        w_g = w_desc.load([expert, row, k0]).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
        w_u = w_desc.load([expert, inter_size + row, k0]).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
        g += tl.sum(w_g * x[None, :], 1)
        u += tl.sum(w_u * x[None, :], 1)
    h = g * tl.sigmoid(g) * u
    tl.store(inter_ptr + pair * stride_it + offs_n, h.to(inter_ptr.dtype.element_ty), mask=offs_n < inter_size)


@triton.jit
def _down_gemv_tma_kernel(
    inter_ptr, w_desc, y_ptr, ids_ptr, weights_ptr, hidden, inter_size, stride_it, stride_yt,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """`_down_gemv_kernel` with the weight tiles [1, BLOCK_N, BLOCK_K] read through the TMA descriptor `w_desc` of
    [E, H, I], STAGES ahead, reduced over K at every step."""
    pdl_enter(USE_PDL)
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int32)
    row = tl.program_id(1) * BLOCK_N
    offs_n = row + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in tl.range(0, inter_size, BLOCK_K, num_stages=STAGES):
        h = tl.load(inter_ptr + pair * stride_it + k0 + offs_k, mask=offs_k < inter_size - k0,
                    other=0.0).to(tl.float32)
        w = w_desc.load([expert, row, k0]).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
        acc += tl.sum(w * h[None, :], 1)
    out = acc * tl.load(weights_ptr + pair).to(tl.float32)
    tl.store(y_ptr + pair * stride_yt + offs_n, out, mask=offs_n < hidden)


def _tma_configs() -> list[triton.Config]:
    """Tile choices for the TMA expert GEMVs, tried once per shape on the GPU; the interpreter gets one. Each sets
    its TMA descriptor's box to the tile (`_tma_box`). The interpreter's differs from the box `_experts_tma` builds
    the descriptors with, so CPU tests see that the config sets it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        tiles = [(8, 32, 2, 4)]
    else:
        tiles = [(n, k, s, 4) for n in (8, 16, 32) for k in (128, 256) for s in (3, 4)]
        tiles += [(32, k, s, 8) for k in (128, 256) for s in (3, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "STAGES": s}, num_warps=w, pre_hook=_tma_box)
            for n, k, s, w in tiles]


def _tma_box(nargs: dict) -> None:
    nargs["w_desc"].block_shape = [1, nargs["BLOCK_N"], nargs["BLOCK_K"]]


_gate_up_gemv_tma_tuned = tuning.autotune(configs=_tma_configs(), key=["hidden", "inter_size", "TOP_K"])(
    _gate_up_gemv_tma_kernel)
_down_gemv_tma_tuned = tuning.autotune(configs=_tma_configs(), key=["hidden", "inter_size"])(_down_gemv_tma_kernel)


def _experts_tma(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor, inter: torch.Tensor, tile: tuple[int, ...] | str) -> torch.Tensor:
    """The GEMV path's two expert kernels with TMA-fetched weights (tile: BLOCK_N, BLOCK_K, STAGES, WARPS, or
    "auto": autotuned); returns the weighted per-pair rows y [pairs, H] (fp32)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    pairs, inter_size = inter.shape
    top_k = ids.shape[1]
    hidden = w_down.shape[1]
    if tile == "auto":     # each config sets the descriptors' box before its launch
        gate_up, down, launch, box = _gate_up_gemv_tma_tuned, _down_gemv_tma_tuned, {}, (16, 64)
    else:
        block_n, block_k, stages, warps = tile
        gate_up, down, box = _gate_up_gemv_tma_kernel, _down_gemv_tma_kernel, (block_n, block_k)
        launch = {"BLOCK_N": block_n, "BLOCK_K": block_k, "STAGES": stages, "num_warps": warps}
    launch.update(pdl.options(x.device))
    gate_up[lambda meta: (pairs, cdiv(inter_size, meta["BLOCK_N"]))](
        x, TensorDescriptor.from_tensor(w_gate_up, [1, *box]), inter, ids, x.shape[1], inter_size,
        x.stride(0), inter.stride(0), TOP_K=top_k, **launch,
    )
    y = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
    down[lambda meta: (pairs, cdiv(hidden, meta["BLOCK_N"]))](
        inter, TensorDescriptor.from_tensor(w_down, [1, *box]), y, ids, weights, hidden, inter_size,
        inter.stride(0), y.stride(0), **launch,
    )
    return y


def topk_sum(y: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """[T * top_k, H] per-expert rows -> [T, H]: each token's top_k rows summed in fp32 in order, rounded to
    dtype once."""
    t, hidden = y.shape[0] // top_k, y.shape[1]
    out = torch.empty(t, hidden, dtype=dtype, device=y.device)
    if t:
        block = min(1024, next_pow2(hidden))
        _topk_sum_kernel[(t, cdiv(hidden, block))](y, out, hidden, y.stride(0), out.stride(0), TOP_K=top_k,
                                                   BLOCK=block, **pdl.options(y.device))
    return out


def fused_moe(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, *, small: bool | None = None, block_m: int | None = None, reduce: bool = True,
) -> torch.Tensor | TopKPartials:
    """sum_k topk_weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t, k].

    x [T, H]; w_gate_up [E, 2I, H]; w_down [E, H, I]; topk_weights [T, K]; topk_ids [T, K] (int32/int64).
    Returns [T, H] in x's dtype, or with `reduce=False` the weighted per-expert rows before that sum
    (`TopKPartials`, for a consumer that adds them itself). small: force the GEMV path (True) or the grouped
    GEMMs (False); default GEMV when T <= SMALL_BATCH_TOKENS. block_m: grouped-GEMM tile rows (default
    `moe_block_m`)."""
    t, hidden = x.shape
    num_experts, two_i, _ = w_gate_up.shape
    inter_size = two_i // 2
    top_k = topk_ids.shape[1]
    assert w_down.shape == (num_experts, hidden, inter_size)
    assert x.stride(-1) == 1 and w_gate_up.stride(-1) == 1 and w_down.stride(-1) == 1
    weights = topk_weights.contiguous()
    ids = topk_ids.contiguous()
    if t == 0:
        return torch.empty_like(x)
    pairs = t * top_k
    inter = x.new_empty(pairs, inter_size)
    if small is None:
        small = t <= SMALL_BATCH_TOKENS
    if small:
        if TMA_TILE is not None and t >= TMA_MIN_TOKENS and tma_ok(w_gate_up) and tma_ok(w_down):
            y = _experts_tma(x, w_gate_up, w_down, weights, ids, inter, TMA_TILE)
        else:
            launch = {**pdl.options(x.device), "STREAM": EVICT_FIRST}
            _gate_up_gemv_kernel[lambda meta: (pairs, cdiv(inter_size, meta["BLOCK_N"]))](
                x, w_gate_up, inter, ids, hidden, inter_size,
                x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), inter.stride(0), TOP_K=top_k, **launch,
            )
            y = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
            _down_gemv_kernel[lambda meta: (pairs, cdiv(hidden, meta["BLOCK_N"]))](
                inter, w_down, y, ids, weights, hidden, inter_size,
                inter.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0), TOP_K=top_k, **launch,
            )
        return topk_sum(y, top_k, x.dtype) if reduce else TopKPartials(y, top_k, x.dtype)
    block_m = block_m or moe_block_m(t, num_experts)
    sorted_pairs, block_experts = moe_align(ids, num_experts, block_m)
    m_blocks = block_experts.shape[0]
    precision = dot_precision(x.dtype)
    _gate_up_kernel[lambda meta: (m_blocks, cdiv(inter_size, meta["BLOCK_N"]))](
        x, w_gate_up, inter, sorted_pairs, block_experts, pairs, hidden, inter_size,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), inter.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, DOT_PRECISION=precision,
    )
    y = x.new_empty(pairs, hidden)
    _down_kernel[lambda meta: (m_blocks, cdiv(hidden, meta["BLOCK_N"]))](
        inter, w_down, y, weights, sorted_pairs, block_experts, pairs, hidden, inter_size,
        inter.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0),
        BLOCK_M=block_m, DOT_PRECISION=precision,
    )
    return topk_sum(y, top_k, x.dtype) if reduce else TopKPartials(y, top_k, x.dtype)


# tokens per expert at which `moe_block_m` picks each tile height: representative problems to tune them on
_TUNE_TOKENS_PER_EXPERT = {16: 8, 32: 32, 64: 128}


def tune(w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int) -> list[int]:
    """Run every autotuned kernel of this expert shape once, so tuning (compiling and timing each tile choice)
    happens now rather than in the middle of serving: the GEMV path at one token and at SMALL_BATCH_TOKENS
    (the register-tile kernels and, where TMA is on, the TMA ones), and the
    grouped GEMMs at each tile height `moe_block_m` picks, on a problem of the size that picks it (the tuner
    keeps the first choice per key, so the problem it sees should be a typical one). Returns the token counts
    run; their outputs are discarded."""
    num_experts, _, hidden = w_gate_up.shape
    gen = torch.Generator(device=w_gate_up.device).manual_seed(0)
    counts = [1, SMALL_BATCH_TOKENS] + [num_experts * per for per in _TUNE_TOKENS_PER_EXPERT.values()]
    for t in counts:
        x = torch.randn(t, hidden, generator=gen, device=w_gate_up.device).to(w_gate_up.dtype)
        ids = torch.randint(0, num_experts, (t, top_k), generator=gen, device=w_gate_up.device)
        weights = torch.full((t, top_k), 1.0 / top_k, device=w_gate_up.device)
        fused_moe(x, w_gate_up, w_down, weights, ids)
    return counts
