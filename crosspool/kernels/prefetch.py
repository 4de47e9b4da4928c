"""L2 prefetch (PTX `prefetch.global.L2::evict_last`): a kernel for a whole tensor (`prefetch_l2`, a measuring
tool) and a Triton helper for a GEMV program's own weight tile (`prefetch_rows`).

A prefetch is fire and forget: nothing comes back to registers, and it never changes a result (a wrong address
only wastes a request). CUDA only (the interpreter has no inline PTX: on CPU the callers leave it out).

1. A side branch of each decode graph (session 7, removed again): it requested a layer's o_proj and the next
   layer's QKV into L2 while the experts streamed past with evict_first loads. On the H200 the decode step got
   slower (OLMoE ctx 1k, batch 1 1.12 -> 1.22 ms; docs/benchmarks.md section 7, session 7). `scripts/
   l2_prefetch_probe.py` shows why: even with the whole weight in L2, cuBLAS's one-token QKV GEMM takes ~7.5 us
   against ~8.9 us cold. The expert loads' evict_first stayed (`fused_moe.EVICT_FIRST`: +0.5-1%).
2. Each GEMV program's weight tile requested before its PDL wait (`WEIGHT_PREFETCH`, off until timed): the
   program launches while the previous kernel finishes (`pdl`), and its weights never depend on that kernel.
   The requests then overlap the previous kernel's tail instead of a separate branch's launch. Used by `gemv`
   (the attention side's projections when they take it, and the MoE router) and `fused_moe`'s down GEMV (its
   expert ids come from the routing kernel two launches back, finished before this one may start)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from crosspool.kernels._common import cdiv, num_sms

# the GEMV kernels (`gemv`, the MoE router, the expert down GEMV) request their weight tiles into L2 before their
# PDL wait, overlapping the previous kernel: CROSSPOOL_WEIGHT_PREFETCH=1 (off until timed on the H200)
WEIGHT_PREFETCH = os.environ.get("CROSSPOOL_WEIGHT_PREFETCH", "0") != "0"
LINE_BYTES = 128
_LINES_PER_PROGRAM_STEP = 256         # lines one program's step requests (2 per thread at 4 warps)


@triton.jit
def _prefetch_kernel(data_ptr, num_lines, LINE: tl.constexpr, BLOCK: tl.constexpr):
    """Request lines [0, num_lines) of `data_ptr` (LINE elements each) into L2 with the evict_last priority, a grid
    stride loop of BLOCK lines a step."""
    step = tl.num_programs(0) * BLOCK
    for start in tl.range(tl.program_id(0) * BLOCK, num_lines, step):
        lines = tl.minimum(start + tl.arange(0, BLOCK), num_lines - 1)     # past the end: repeat the last line
        _prefetch_lines(data_ptr + lines.to(tl.int64) * LINE, True)


@triton.jit
def _prefetch_lines(ptrs, EVICT_LAST: tl.constexpr):
    """Request every address in `ptrs` (one per 128-byte line) into L2: with the evict_last priority (to keep it
    there) or the normal one (about to be read once)."""
    if EVICT_LAST:
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2::evict_normal [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_rows(w_ptr, rows, stride_w, k_start, k_stop, LINE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Request columns [k_start, k_stop) of the weight rows `rows` (valid row indices) into L2, BLOCK_K columns
    (BLOCK_K // LINE lines, LINE elements each) a step: what a GEMV program is about to read (normal priority:
    read once). Issued before a kernel's PDL wait, it overlaps the previous kernel (weights never depend on it)."""
    row_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w
    for k0 in tl.range(k_start, k_stop, BLOCK_K):
        cols = tl.minimum(k0 + tl.arange(0, BLOCK_K // LINE) * LINE, k_stop - 1)
        _prefetch_lines(row_ptrs + cols[None, :], False)


def applies(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def weight_options(w: torch.Tensor) -> dict[str, object]:
    """Launch keywords for a kernel with PREFETCH / LINE parameters reading the weight `w`: on with
    WEIGHT_PREFETCH on CUDA (the interpreter has no inline PTX)."""
    return {"PREFETCH": WEIGHT_PREFETCH and applies(w), "LINE": LINE_BYTES // w.element_size()}


def prefetch_l2(t: torch.Tensor, programs: int | None = None) -> None:
    """Request every line of the contiguous tensor `t` into L2 (CUDA; elsewhere nothing). programs: the grid
    (default a quarter of the SMs, so the prefetch shares the GPU with the kernels it runs beside)."""
    if not applies(t):
        return
    assert t.is_contiguous(), "prefetch_l2 covers a contiguous tensor"
    line = LINE_BYTES // t.element_size()
    num_lines = cdiv(t.numel(), line)
    if num_lines == 0:
        return
    grid = programs or max(1, num_sms(t.device) // 4)
    grid = min(grid, cdiv(num_lines, _LINES_PER_PROGRAM_STEP))
    _prefetch_kernel[(grid,)](t, num_lines, LINE=line, BLOCK=_LINES_PER_PROGRAM_STEP, num_warps=4)
