"""Skinny GEMM ("GEMV") for decode: y[T, N] = x[T, K] @ W[N, K]^T (+ bias) for T <= MAX_GEMV_TOKENS tokens.

Replaces `torch_ref.linear` for the attention side's dense projections at a few tokens (fused QKV, o_proj,
lm_head), where the step is bound by reading W once: at one token cuBLAS reads the 2048-wide projections at
about half the copy bandwidth.

Shapes and strides: x [T, K] with a contiguous last dim (any row stride), W [N, K] with a contiguous last dim,
bias [N] or None; returns y [T, N] (contiguous) in x's dtype.

Design, for bandwidth:
- each program owns BLOCK_N output columns for all T tokens, so every weight element is read from memory once
  per call whatever T is; x (a few KB) is re-read by every program from L2;
- it walks K in BLOCK_K steps, multiplying a [BLOCK_N, BLOCK_K] weight tile by each token's x slice into a
  [BLOCK_T, BLOCK_N, BLOCK_K] fp32 register tile (BLOCK_T = T rounded up to a power of two), and reduces
  over K once at the end (no per-step reductions, no tensor cores: M is 1..8);
- split-K for narrow outputs: N = 2048 at BLOCK_N = 16 makes only 128 programs for 132 SMs, too few to keep
  enough loads in flight. With split_k = S > 1 program (n, s) covers the s-th of S K-chunks and stores its fp32
  partial sums into a [S, T, N] buffer; `_split_sum_kernel` adds the S partials in a fixed order (deterministic,
  no atomics) and rounds. The host picks S from N and the SM count (`default_split_k`), callers may force it.
Accumulation is fp32, rounded once to x's dtype after the bias add (as torch's linear rounds). BLOCK_N, BLOCK_K
and warps are autotuned on the GPU once per (N, K, BLOCK_T, split); the tile sizes tried are bounded by the
registers the accumulator needs (`_prune_configs`). Launches allocate only their output (and the partial
buffer), and never sync with the host: graph-capturable.

`ENABLED` switches the attention side's use of it (`AttentionSide._linear`); off until the H200 shows a gain.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from crosspool.kernels import pdl, tuning
from crosspool.kernels._common import cdiv, env_int, next_pow2, num_sms
from crosspool.kernels.pdl import enter as pdl_enter

MAX_GEMV_TOKENS = 8
ENABLED = False            # the attention side's decode linears call `gemv` at every decode size when this is set
# ... and at up to ROWS rows (CROSSPOOL_GEMV_ROWS; 0: never): at one token it ties cuBLAS (benchmarks section 7,
# sessions 4 and 8), although unlike cuBLAS it takes part in PDL
ROWS = env_int("CROSSPOOL_GEMV_ROWS", 0)
# the MoE router (64-128 outputs) calls `gemv`: on the H200 it beat cuBLAS at 1-8 tokens (3.0-4.4 us vs 4.8-5.2 us,
# benchmarks section 7, session 4), where the wider projections did not
ROUTER = True
# ... and with the post-attention residual add + RMSNorm inside it (`norm_gemv_parts`) in whole-step decode graphs
# of up to ROUTER_NORM tokens (CROSSPOOL_ROUTER_NORM; 0: never): one kernel fewer per MoE layer. On the H200
# (session 12) OLMoE's step took 1.06 against 1.07 ms at one token, and 3.19-3.21 against 3.18 at eight
ROUTER_NORM = env_int("CROSSPOOL_ROUTER_NORM", 1)

# registers per thread a tile's accumulator and weight tile may take together ((BLOCK_T + 1) x the weight
# elements each thread loads): ptxas for sm_90 spills past about this
_TILE_REGS = 160


def _configs() -> list[triton.Config]:
    """Tile choices, tried once per (N, K, BLOCK_T, SPLIT_K) on the GPU; the interpreter (CPU tests) gets one."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
            for n in (4, 8, 16, 32) for k in (128, 256, 512) for w in (4, 8)]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Keep tiles whose weight loads are at least 4 elements per thread (vector loads) and whose
    [BLOCK_T, BLOCK_N, BLOCK_K] accumulator plus the loaded weights fit in _TILE_REGS registers per thread."""
    block_t = int(kwargs.get("BLOCK_T", named_args.get("BLOCK_T", 1)))   # type: ignore[arg-type]

    def per_thread(c: triton.Config) -> int:
        return c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps)

    keep = [c for c in configs if 4 <= per_thread(c) and (block_t + 1) * per_thread(c) <= _TILE_REGS]
    return keep or [min(configs, key=per_thread)]


@triton.jit
def _tile(T, N, K, BLOCK_T: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A GEMV program's share: its K-split, token and output offsets with their masks, and the K range it walks.
    Every split walks the same number of BLOCK_K steps; steps past K load nothing (masked)."""
    pid_k = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    return (pid_k, offs_t, offs_t < T, offs_n, offs_n < N, tl.arange(0, BLOCK_K), pid_k * k_chunk, k_chunk)


@tuning.autotune(configs=_configs(), key=["N", "K", "BLOCK_T", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, T, N, K,
    stride_xt, stride_wn, stride_os, stride_ot,
    BLOCK_T: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """out[s, t, n-block] = x[t, K-chunk s] . w[n, K-chunk s] (+ bias, only when SPLIT_K == 1), all T tokens
    per weight tile read. out is y itself when SPLIT_K == 1 (stride_os unused), else the fp32 partials."""
    pdl_enter(USE_PDL)
    pid_k, offs_t, t_ok, offs_n, n_ok, offs_k, k_start, k_chunk = _tile(T, N, K, BLOCK_T, SPLIT_K, BLOCK_N, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]     # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :]                  # [BLOCK_T, BLOCK_K]
    acc = tl.zeros([BLOCK_T, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(k_start, k_start + k_chunk, BLOCK_K):
        k_ok = offs_k < K - k0
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptrs + k0, mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += w[None, :, :] * x[:, None, :]
    y = tl.sum(acc, 2)                                                               # [BLOCK_T, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + pid_k * stride_os + offs_t[:, None] * stride_ot + offs_n[None, :],
             y.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


@tuning.autotune(configs=_configs(), key=["N", "K", "BLOCK_T", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _norm_gemv_kernel(
    d_ptr, r_ptr, nw_ptr, w_ptr, x_out_ptr, h_out_ptr, out_ptr, T, N, K, eps,
    stride_dt, stride_rt, stride_xt, stride_ht, stride_wn, stride_os, stride_ot,
    BLOCK_T: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """`_gemv_kernel` (no bias) on x = rms_norm(h) * nw, h = residual + d rounded to d's dtype, as
    `norm_rope.add_rms_norm` computes them: each program sums the whole rows' squares itself, then norms its
    K-chunk as it reads it; the programs of the first output block also store their K-chunk of x and h."""
    pdl_enter(USE_PDL)
    pid_k, offs_t, t_ok, offs_n, n_ok, offs_k, k_start, k_chunk = _tile(T, N, K, BLOCK_T, SPLIT_K, BLOCK_N, BLOCK_K)
    dtype = d_ptr.dtype.element_ty
    d_rows = d_ptr + offs_t[:, None] * stride_dt + offs_k[None, :]                  # [BLOCK_T, BLOCK_K]
    r_rows = r_ptr + offs_t[:, None] * stride_rt + offs_k[None, :]
    squares = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ok = t_ok[:, None] & (offs_k < K - k0)[None, :]
        h = (tl.load(d_rows + k0, mask=ok, other=0.0).to(tl.float32)
             + tl.load(r_rows + k0, mask=ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
        squares += h * h
    rstd = tl.rsqrt(tl.sum(squares, 1) / K + eps)                                    # [BLOCK_T]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]     # [BLOCK_N, BLOCK_K]
    acc = tl.zeros([BLOCK_T, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(k_start, k_start + k_chunk, BLOCK_K):
        k_ok = offs_k < K - k0
        ok = t_ok[:, None] & k_ok[None, :]
        h = (tl.load(d_rows + k0, mask=ok, other=0.0).to(tl.float32)
             + tl.load(r_rows + k0, mask=ok, other=0.0).to(tl.float32)).to(dtype)
        normed = (h.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)
        nw = tl.load(nw_ptr + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        x = (nw[None, :] * normed).to(x_out_ptr.dtype.element_ty)
        if tl.program_id(0) == 0:
            tl.store(x_out_ptr + offs_t[:, None] * stride_xt + k0 + offs_k[None, :], x, mask=ok)
            tl.store(h_out_ptr + offs_t[:, None] * stride_ht + k0 + offs_k[None, :], h, mask=ok)
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += w[None, :, :] * x.to(w_ptr.dtype.element_ty).to(tl.float32)[:, None, :]
    y = tl.sum(acc, 2)
    tl.store(out_ptr + pid_k * stride_os + offs_t[:, None] * stride_ot + offs_n[None, :],
             y.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def _split_sum_kernel(part_ptr, b_ptr, y_ptr, N, stride_ps, stride_pt, stride_yt,
                      SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                      USE_PDL: tl.constexpr = False):
    """y[t, n-block] = sum_s part[s, t, n-block] (s in order) (+ bias), rounded to y's dtype."""
    pdl_enter(USE_PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + t * stride_pt + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_yt + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def default_split_k(n: int, k: int, device: torch.device) -> int:
    """K-splits so that the programs at BLOCK_N = 16 number at least twice the SMs, each split keeping at
    least 512 of K (1 for wide outputs such as QKV or lm_head, and off the GPU)."""
    blocks = cdiv(n, 16)
    split = next_pow2(cdiv(2 * num_sms(device), blocks))
    while split > 1 and k // split < 512:
        split //= 2
    return min(split, 8)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
         split_k: int | None = None) -> torch.Tensor:
    """x [T, K] @ w[N, K]^T (+ bias [N]) for T <= MAX_GEMV_TOKENS; returns [T, N] in x's dtype.
    split_k: K-chunks summed by a second kernel (default `default_split_k`)."""
    out, split = gemv_parts(x, w, bias, split_k=split_k)
    if split == 1:
        return out
    t, n = out.shape[1:]
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y          # never read without HAS_BIAS
    block = min(1024, next_pow2(n))
    _split_sum_kernel[(t, cdiv(n, block))](out, b, y, n, out.stride(0), out.stride(1), y.stride(0),
                                           SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block,
                                           **pdl.options(x.device))
    return y


def gemv_parts(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
               split_k: int | None = None) -> tuple[torch.Tensor, int]:
    """`gemv`'s first kernel, for callers that finish the sum themselves (the MoE router sums its K-splits in
    the routing kernel): (y [T, N] in x's dtype, 1) when it runs unsplit, else (partials [S, T, N] fp32, S),
    to be summed in order of s and rounded to x's dtype (+ bias after the sum: the partials leave it out)."""
    _check(x, w, bias)
    t, k = x.shape
    n = w.shape[0]
    split = 1 if t == 0 else split_k or default_split_k(n, k, x.device)
    assert split >= 1
    block_t = next_pow2(t)
    launch = pdl.options(x.device)
    if split == 1:
        y = torch.empty(t, n, dtype=x.dtype, device=x.device)
        if t:
            _gemv_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]), 1)](
                x, w, bias if bias is not None else y, y, t, n, k, x.stride(0), w.stride(0), 0, y.stride(0),
                BLOCK_T=block_t, SPLIT_K=1, HAS_BIAS=bias is not None, **launch,
            )
        return y, 1
    part = torch.empty(split, t, n, dtype=torch.float32, device=x.device)
    _gemv_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]), split)](
        x, w, part, part, t, n, k, x.stride(0), w.stride(0), part.stride(0), part.stride(1),
        BLOCK_T=block_t, SPLIT_K=split, HAS_BIAS=False, **launch,
    )
    return part, split


def norm_gemv_parts(delta: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    w: torch.Tensor, *, split_k: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`gemv_parts(x, w)` with x, h = `norm_rope.add_rms_norm(delta, residual, norm_weight, eps)` computed inside
    the GEMV (one kernel instead of two). Returns (x [T, K], h [T, K], the product as `gemv_parts` gives it,
    split). x is in the norm's output dtype (promote(norm_weight, delta)), h in delta's."""
    _check(delta, w, None)
    t, k = delta.shape
    assert residual.shape == delta.shape and residual.stride(-1) == 1 and norm_weight.shape == (k,)
    assert norm_weight.is_contiguous() and residual.dtype == delta.dtype
    n = w.shape[0]
    x = torch.empty(t, k, dtype=torch.promote_types(norm_weight.dtype, delta.dtype), device=delta.device)
    h = torch.empty_like(delta)
    split = 1 if t == 0 else split_k or default_split_k(n, k, delta.device)
    if split == 1:
        out = torch.empty(t, n, dtype=x.dtype, device=delta.device)
        stride_os = 0
    else:
        out = torch.empty(split, t, n, dtype=torch.float32, device=delta.device)
        stride_os = out.stride(0)
    if t:
        _norm_gemv_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]), split)](
            delta, residual, norm_weight, w, x, h, out, t, n, k, eps,
            delta.stride(0), residual.stride(0), x.stride(0), h.stride(0), w.stride(0), stride_os, out.stride(-2),
            BLOCK_T=next_pow2(t), SPLIT_K=split, **pdl.options(delta.device),
        )
    return x, h, out, split


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The shapes and strides both GEMV kernels take (module docstring)."""
    assert x.dim() == 2 and w.dim() == 2, (x.shape, w.shape)
    assert w.shape[1] == x.shape[1], (x.shape, w.shape)
    assert x.shape[0] <= MAX_GEMV_TOKENS, f"gemv serves at most {MAX_GEMV_TOKENS} tokens, got {x.shape[0]}"
    assert x.stride(1) == 1 and w.stride(1) == 1, "x and w need a contiguous last dim"
    assert bias is None or (bias.shape == (w.shape[0],) and bias.stride(0) == 1)


def applies(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> bool:
    """Whether the kernel serves x @ w^T (+ b): CUDA, 2-D x of at most MAX_GEMV_TOKENS rows, contiguous last
    dims (elsewhere callers use torch's linear)."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_GEMV_TOKENS and x.stride(-1) == 1
            and w.stride(-1) == 1 and (b is None or b.stride(-1) == 1))


def token_tiles() -> list[int]:
    """One token count per compiled (and autotuned) variant: BLOCK_T is the token count rounded up to a power
    of two, so these cover every call of 1..MAX_GEMV_TOKENS tokens (what a startup warm-up runs)."""
    return [1 << i for i in range(MAX_GEMV_TOKENS.bit_length()) if 1 << i <= MAX_GEMV_TOKENS]


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, use: bool | None = None
           ) -> torch.Tensor:
    """The Triton path's decode-sized projections: `gemv` when `use` (default: ENABLED, or at most ROWS rows), on
    CUDA, for 2-D x of at most MAX_GEMV_TOKENS rows with contiguous last dims; torch's linear otherwise."""
    if use is None:
        use = ENABLED or x.shape[0] <= ROWS
    if use and applies(x, w, b):
        return gemv(x, w, b)
    return torch.nn.functional.linear(x, w, b)

