"""Copies between pinned host memory and the device done by the SMs, not by a copy engine (issue 4).

A decode step at batch 1 moves a few hundred bytes each way: its metadata in, its greedy tokens out. As
`cudaMemcpyAsync` calls those are copy-engine work between the step's kernels, and on the H200 each switch from
the compute engine to a copy engine and back left the GPU idle: 11-14 us before the metadata copy, 3 before the
first kernel, 5.6 before the tokens' copy, ~20 us of a 930-us step (`bench decode --profile`, session 22). Pinned
host memory has a device address (unified addressing: the same as the host's), so a kernel can read or write it
itself: the step then stays on one engine. `host_view` gives a pinned tensor's device view; `copy` runs the
kernel. Reference: `dst.copy_(src)`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crosspool.kernels._common import cdiv

BLOCK = 1024


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, src2_ptr, dst2_ptr, n2, blocks, BLOCK: tl.constexpr):
    """Programs [0, blocks) copy the first pair's n elements, the rest the second pair's n2."""
    pid = tl.program_id(0)
    if pid < blocks:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)
    else:
        offs = (pid - blocks) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst2_ptr + offs, tl.load(src2_ptr + offs, mask=offs < n2), mask=offs < n2)


class _CudaArray:
    """A device address range as `__cuda_array_interface__` (what torch.as_tensor wraps without copying)."""

    def __init__(self, t: torch.Tensor) -> None:
        typestr = {torch.int64: "<i8", torch.int32: "<i4", torch.float32: "<f4"}.get(t.dtype)
        if typestr is None:
            raise ValueError(f"host_view: dtype {t.dtype} not supported (int64, int32, float32)")
        self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": typestr,
                                         "data": (t.data_ptr(), False), "strides": None, "version": 3}


def host_view(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor on `device` over the memory of pinned, contiguous host tensor t (no copy: reads and writes
    through it go over the bus to t)."""
    if t.device.type != "cpu" or not t.is_pinned() or not t.is_contiguous():
        raise ValueError("host_view needs a pinned, contiguous host tensor")
    return torch.as_tensor(_CudaArray(t), device=device)


def copy(dst: torch.Tensor, src: torch.Tensor, dst2: torch.Tensor | None = None,
         src2: torch.Tensor | None = None) -> None:
    """dst[:] = src (and dst2[:] = src2, in the same launch): each pair of one dtype and element count, contiguous
    and addressable by the device (either may be a `host_view`); a kernel on the current stream, no wait."""
    if (dst2 is None) != (src2 is None):
        raise ValueError("copy: a second pair needs both dst2 and src2")
    pairs = [(dst, src)] + ([(dst2, src2)] if dst2 is not None else [])
    for d, s in pairs:
        if d.dtype != s.dtype or d.numel() != s.numel():
            raise ValueError(f"copy: {s.dtype} x {s.numel()} into {d.dtype} x {d.numel()}")
        if not (d.is_contiguous() and s.is_contiguous()):
            raise ValueError("copy: both tensors must be contiguous")
    (d1, s1), (d2, s2) = pairs[0], pairs[-1]
    n, n2 = s1.numel(), (s2.numel() if len(pairs) == 2 else 0)
    blocks = cdiv(n, BLOCK)
    if n + n2:
        _copy_kernel[(blocks + cdiv(n2, BLOCK),)](s1, d1, n, s2, d2, n2, blocks, BLOCK=BLOCK)
