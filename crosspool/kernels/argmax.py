"""Greedy tokens on the device: `logits.argmax(dim=-1)` for the decode step's head, in two short kernels.

torch's argmax reduces a row of the vocabulary (50k-152k logits) in one block per row, ~13.5 us a step on the
H200 at batch 1 (OLMoE). Here stage 1 cuts each row into BLOCK-wide chunks, one program each, and keeps every
chunk's maximum and its first index; stage 2 picks, per row, the largest of those (the lowest index among
equals), so ties resolve to the lowest index as torch's does. NaN logits are not handled (the engine's never
are). Reference: `torch.argmax`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crosspool.kernels import pdl
from crosspool.kernels._common import cdiv, next_pow2
from crosspool.kernels.pdl import enter as pdl_enter

BLOCK = 4096


@triton.jit
def _chunk_max_kernel(x_ptr, max_ptr, idx_ptr, n, stride_x, chunks, BLOCK: tl.constexpr,
                      USE_PDL: tl.constexpr = False):
    """max_ptr/idx_ptr[row, chunk] = the chunk's largest logit and its first index."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
    best = tl.max(x, 0)
    first = tl.min(tl.where(x == best, offs, n), 0)
    tl.store(max_ptr + row * chunks + chunk, best)
    tl.store(idx_ptr + row * chunks + chunk, first)


@triton.jit
def _pick_kernel(max_ptr, idx_ptr, out_ptr, n, chunks, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr = False):
    """out[row] = the first index of the row's largest chunk maximum (chunks hold increasing indices)."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < chunks
    best = tl.load(max_ptr + row * chunks + offs, mask=ok, other=float("-inf"))
    idx = tl.load(idx_ptr + row * chunks + offs, mask=ok, other=n)
    top = tl.max(best, 0)
    tl.store(out_ptr + row, tl.min(tl.where(ok & (best == top), idx, n), 0).to(tl.int64))


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (last dim contiguous) -> int64 [B], as `logits.argmax(dim=-1)`, written into `out` when
    given."""
    assert logits.dim() == 2 and logits.stride(-1) == 1
    rows, n = logits.shape
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    assert out.shape == (rows,) and out.dtype == torch.int64 and out.is_contiguous()
    if rows == 0:
        return out
    chunks = cdiv(n, BLOCK)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    launch = pdl.options(logits.device)
    _chunk_max_kernel[(rows, chunks)](logits, best, idx, n, logits.stride(0), chunks, BLOCK=BLOCK, num_warps=8,
                                      **launch)
    _pick_kernel[(rows,)](best, idx, out, n, chunks, BLOCK_C=max(16, next_pow2(chunks)), **launch)
    return out
