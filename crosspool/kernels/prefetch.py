"""L2 prefetch (PTX `prefetch.global.L2::evict_last`) of a whole tensor (`prefetch_l2`): a measuring tool, used by
`scripts/l2_prefetch_probe.py`; nothing in the engine calls it.

A prefetch is fire and forget: nothing comes back to registers, and it never changes a result (a wrong address
only wastes a request). CUDA only (the interpreter has no inline PTX: elsewhere it does nothing).

What was tried with it, measured slower on the H200 and removed (docs/benchmarks.md section 7):
1. A side branch of each decode graph (session 7): it requested a layer's o_proj and the next layer's QKV into L2
   while the experts streamed past with evict_first loads. OLMoE ctx 1k, batch 1: 1.12 -> 1.22 ms. The probe
   shows why: even with the whole weight in L2, cuBLAS's one-token QKV GEMM takes ~7.5 us against ~8.9 us cold.
   The expert loads' evict_first stayed (`fused_moe.EVICT_FIRST`: +0.5-1%).
2. Each GEMV program's weight tile requested before its PDL wait (sessions 7-8, at commit 09cba21): batch 1
   1.13 -> 1.49 ms, batch 8 3.33 -> 5.42 ms. The requests took the load slots of the kernel before."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from crosspool.kernels._common import cdiv, num_sms

LINE_BYTES = 128
_LINES_PER_PROGRAM_STEP = 256         # lines one program's step requests (2 per thread at 4 warps)


@triton.jit
def _prefetch_kernel(data_ptr, num_lines, LINE: tl.constexpr, BLOCK: tl.constexpr):
    """Request lines [0, num_lines) of `data_ptr` (LINE elements each) into L2 with the evict_last priority, a grid
    stride loop of BLOCK lines a step."""
    step = tl.num_programs(0) * BLOCK
    for start in tl.range(tl.program_id(0) * BLOCK, num_lines, step):
        lines = tl.minimum(start + tl.arange(0, BLOCK), num_lines - 1)     # past the end: repeat the last line
        _prefetch_lines(data_ptr + lines.to(tl.int64) * LINE)


@triton.jit
def _prefetch_lines(ptrs):
    """Request every address in `ptrs` (one per 128-byte line) into L2 with the evict_last priority."""
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


def applies(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


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
