"""Ordering between the programs of one launch, for the split-KV merge inside the attention kernels
(`paged_attention.LAST_SPLIT_MERGES`): a gpu-scope fence and the counter buffers it needs.

- `fence_gpu`: every thread's earlier stores are visible GPU-wide before its later ones (PTX fence.acq_rel.gpu).
- `counters`: int32 buffers, one per (use, device, stream), zeroed once and left at zero by the kernels that use
  them: kernels on one stream run one after another, kernels on two streams (lanes, pipeline sides) may run at
  once. They are never freed, since a captured CUDA graph keeps the address it was captured with, and a new one
  is never made inside a capture.

The interpreter (CPU tests) has no inline PTX: kernels skip the fence there.

A grid barrier lived here for a persistent MoE kernel (sessions 7-8, last at commit 34ca6b2), removed with it: the
kernel streamed the experts at 0.4-0.57 of copy bandwidth against 0.7-0.84 for the separate kernels
(docs/benchmarks.md section 7, session 8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crosspool.kernels._common import next_pow2

_buffers: dict[tuple[str, str, int | None, int], torch.Tensor] = {}
_every_buffer: list[tuple[str, torch.Tensor]] = []


@triton.jit
def fence_gpu(x):
    """fence.acq_rel.gpu in every thread (x: any scalar, for the asm's operand)."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                              is_pure=False, pack=1)


def counters(use: str, n: int, device: torch.device) -> torch.Tensor:
    """At least n zeroed int32 counters for `use` on the current stream of `device` (see the module's notes)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (use, device.type, device.index, stream)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the {use} counters for this stream are set up on the first launch outside a CUDA "
                               "graph capture: run the step once before capturing it")
        buf = torch.zeros(max(next_pow2(n), 1 << 12), dtype=torch.int32, device=device)
        _buffers[key] = buf
        _every_buffer.append((use, buf))
    return buf


def all_counters(use: str) -> list[torch.Tensor]:
    """Every counter buffer made so far for `use` (tests: the split merge's must be back at zero)."""
    return [buf for u, buf in _every_buffer if u == use]
