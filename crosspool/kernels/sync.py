"""Ordering between the programs of one launch: a gpu-scope fence, a grid barrier, and the counter buffers both
need.

- `fence_gpu`: every thread's earlier stores are visible GPU-wide before its later ones (PTX fence.acq_rel.gpu).
- `grid_barrier`: every program of the launch waits until all have arrived: a counter and a sense flag in global
  memory (the last to arrive resets the counter and flips the flag; the others spin on the flag). All programs
  must be resident at once: a grid of at most the SMs, and nothing sharing them that waits on this launch
  (`moe_persistent` says how it keeps to that).
- `counters`: int32 buffers, one per (use, device, stream), zeroed once and left at zero by the kernels that use
  them: kernels on one stream run one after another, kernels on two streams (lanes, pipeline sides) may run at
  once. They are never freed, since a captured CUDA graph keeps the address it was captured with, and a new one
  is never made inside a capture.

The interpreter (CPU tests) runs programs one after another, so nothing here may spin there: kernels compile the
barrier out (their callers run the phases as separate launches instead) and skip the fence (inline PTX).
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


@triton.jit
def grid_barrier(bar_ptr, sense, num_programs, SPIN_LOAD: tl.constexpr = True):
    """Wait until every program of the launch has called this with the same `sense` (read from bar_ptr[1] at the
    kernel's start); returns the sense for the next barrier. bar_ptr[0] counts arrivals, bar_ptr[1] is the
    flag. SPIN_LOAD: the waiting programs poll the flag with volatile loads (answered by L2 side by side) and
    fence once it flips; else with atomic reads (serialized on the flag's address, the releasing exchange
    queued behind them)."""
    fence_gpu(sense)
    tl.debug_barrier()
    arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == num_programs - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(bar_ptr + 1, 1 - sense, sem="release", scope="gpu")
    elif SPIN_LOAD:
        flag = tl.load(bar_ptr + 1, volatile=True)
        while flag == sense:
            flag = tl.load(bar_ptr + 1, volatile=True)
    else:
        flag = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
        while flag == sense:
            flag = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    fence_gpu(sense)
    return 1 - sense


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


def prepare(device: torch.device, uses: dict[str, int]) -> None:
    """Make the counters of `uses` ({use: count}) for the current stream of `device` now, outside a capture: for
    graphs captured without an eager run first (the weights ranks' whole-pass graphs)."""
    for use, n in uses.items():
        counters(use, n, device)


def all_counters(use: str) -> list[torch.Tensor]:
    """Every counter buffer made so far for `use` (tests: the split merge's must be back at zero)."""
    return [buf for u, buf in _every_buffer if u == use]
