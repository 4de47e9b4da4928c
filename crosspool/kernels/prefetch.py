"""L2 prefetch of the attention side's weights during a decode step (experimental: off until the H200 shows a gain).

Why: at batch 1 a layer's QKV and o_proj GEMMs read 25 + 8 MB (OLMoE) at about 0.6 of copy bandwidth. They
are latency-bound, not bandwidth-bound: each program waits on its loads from HBM. Meanwhile the layer's
latency-bound kernels (norm, attention at short context, routing) leave HBM mostly idle. The H200's L2 (50 MB)
holds a layer's attention weights, so they can be fetched into L2 during those idle stretches, and the GEMMs
then read them from L2.

How: `prefetch_l2` issues PTX `prefetch.global.L2::evict_last` for every 128-byte line of a tensor: fire and
forget, nothing comes back to registers, so the kernel ends once the requests are issued and the lines arrive
in the background. The attention side (`models.attention_side`, when `ENABLED`) runs it on a side stream forked
at the start of layer l's attention block, for layer l's o_proj and layer l+1's QKV, and joins it at the block's
end. The experts stream through L2 between the prefetch and the next layer's QKV: their GEMV loads say
`evict_first` (`fused_moe`), so they push out each other before the prefetched lines.

`CROSSPOOL_L2_PREFETCH=1` turns it on (`ENABLED`); CUDA only (the interpreter has no inline PTX: on CPU it does
nothing). It never changes a result: a prefetch only moves data between HBM and L2.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from crosspool.kernels._common import cdiv, num_sms

ENABLED = os.environ.get("CROSSPOOL_L2_PREFETCH", "0") != "0"
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


class SideStream:
    """Prefetches forked off the current stream and joined back (a parallel branch when captured in a CUDA
    graph). One side stream per stream the work is issued on, so lanes and pipeline sides stay apart."""

    def __init__(self) -> None:
        self._sides: dict[int, torch.cuda.Stream] = {}
        self._forked: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None     # (main, side)

    def fork(self, tensors: list[torch.Tensor]) -> None:
        """Start prefetching `tensors` beside the current stream's work (CUDA; elsewhere nothing)."""
        tensors = [t for t in tensors if applies(t)]
        if not tensors:
            return
        assert self._forked is None, "fork before the previous prefetch was joined"
        main = torch.cuda.current_stream(tensors[0].device)
        side = self._sides.get(main.cuda_stream)
        if side is None:
            side = self._sides[main.cuda_stream] = torch.cuda.Stream(tensors[0].device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for t in tensors:
                prefetch_l2(t)
        self._forked = (main, side)

    def join(self) -> None:
        """The stream that forked waits for the prefetches (a graph capture must join every fork)."""
        if self._forked is not None:
            main, side = self._forked
            main.wait_stream(side)
            self._forked = None
