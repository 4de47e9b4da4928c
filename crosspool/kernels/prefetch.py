"""L2 prefetch of a tensor (PTX `prefetch.global.L2::evict_last`): a measuring tool, not on the engine's path.

Why it was built: at batch 1 a layer's QKV and o_proj GEMMs read 25 + 8 MB (OLMoE) at about 0.6 of copy
bandwidth, while the layer's latency-bound kernels leave HBM mostly idle, and the H200's L2 (50 MB) holds a
layer's attention weights. A side branch of each decode graph requested a layer's o_proj and the next layer's
QKV into L2 while the experts streamed past with evict_first loads.

What the H200 said (docs/benchmarks.md section 7, session 7): the decode step got slower (OLMoE ctx 1k, batch 1
1.12 -> 1.22 ms), and `scripts/l2_prefetch_probe.py` showed why. Even with the whole weight in L2, cuBLAS's QKV
GEMM at one token takes ~7.5 us against ~8.9 us cold: it is not bound by where its bytes come from. So the engine
side was removed. The expert loads' evict_first stayed (`fused_moe.EVICT_FIRST`: +0.5-1%). This kernel stays for
the probe, to ask the question again on other shapes.

`prefetch_l2` issues one prefetch per 128-byte line: fire and forget, nothing comes back to registers, so the
kernel ends once the requests are issued. CUDA only (the interpreter has no inline PTX: elsewhere it does
nothing). It never changes a result.
"""

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
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                  [data_ptr + lines.to(tl.int64) * LINE], dtype=tl.int32, is_pure=False, pack=1)


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
